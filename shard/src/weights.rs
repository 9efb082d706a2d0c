//! Checkpoint access behind one VarBuilder-like interface: model code asks for tensors
//! by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`) whatever the
//! file format. Safetensors are memory-mapped (single file or sharded through
//! `model.safetensors.index.json`); GGUF names are translated (`blk.0.attn_q.weight`)
//! and quantized matrices stay quantized behind `QMatMul`. Packed formats (AWQ, GPTQ,
//! FP8) are read as stored (`stored_part`) for the linear layers to decode.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use model_store::quantization::Quantization;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

enum Checkpoint {
    Safetensors(MmapedSafetensors),
    Gguf {
        content: gguf_file::Content,
        file: Mutex<File>,
        path: PathBuf,
    },
}

/// A view of a checkpoint under a name prefix; cheap to clone.
#[derive(Clone)]
pub struct Weights {
    checkpoint: Arc<Checkpoint>,
    prefix: String,
    dtype: DType,
    device: Device,
    /// The linear layers' format; None for dense (or GGUF) weights.
    quantization: Option<Arc<Quantization>>,
}

impl Weights {
    /// The safetensors of an HF-layout directory: the files named by
    /// `model.safetensors.index.json` when present, else `model.safetensors`, else
    /// every `*.safetensors` file of the directory.
    pub fn from_safetensors_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; the server does not modify its model files.
        let tensors = unsafe { MmapedSafetensors::multi(&files)? };
        Ok(Self::new(Checkpoint::Safetensors(tensors), dtype, device))
    }

    /// A GGUF file whose header `content` was already read.
    pub fn from_gguf(
        path: &Path,
        content: gguf_file::Content,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| candle_core::Error::msg(format!("opening {}: {e}", path.display())))?;
        Ok(Self::new(
            Checkpoint::Gguf {
                content,
                file: Mutex::new(file),
                path: path.to_path_buf(),
            },
            dtype,
            device,
        ))
    }

    fn new(checkpoint: Checkpoint, dtype: DType, device: &Device) -> Self {
        Self {
            checkpoint: Arc::new(checkpoint),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            quantization: None,
        }
    }

    /// The same checkpoint, its linear layers read as `quantization` says.
    pub fn with_quantization(self, quantization: Option<Quantization>) -> Self {
        Self {
            quantization: quantization.map(Arc::new),
            ..self
        }
    }

    pub fn quantization(&self) -> Option<&Quantization> {
        self.quantization.as_deref()
    }

    /// The same checkpoint with `name` appended to the prefix (`pp("model").pp("layers")`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn is_gguf(&self) -> bool {
        self.gguf_content().is_some()
    }

    /// The GGUF header (metadata and tensor index); None for safetensors.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match &*self.checkpoint {
            Checkpoint::Gguf { content, .. } => Some(content),
            Checkpoint::Safetensors(_) => None,
        }
    }

    /// `name` under the prefix, as error messages name tensors.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The name of the tensor in the file (GGUF names differ from the HF ones).
    fn file_name(&self, name: &str) -> Result<String> {
        let full = self.full_name(name);
        match &*self.checkpoint {
            Checkpoint::Safetensors(_) => Ok(full),
            Checkpoint::Gguf { .. } => match gguf_name(&full) {
                Some(gguf) => Ok(gguf),
                None => bail!("no GGUF name for tensor {full}"),
            },
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let Ok(file_name) = self.file_name(name) else {
            return false;
        };
        match &*self.checkpoint {
            Checkpoint::Safetensors(st) => st.get(&file_name).is_ok(),
            Checkpoint::Gguf { content, .. } => content.tensor_infos.contains_key(&file_name),
        }
    }

    /// A dense tensor in the activation dtype (quantized GGUF tensors are dequantized).
    pub fn tensor(&self, name: &str, shape: impl Into<Shape>) -> Result<Tensor> {
        self.tensor_part(name, shape, None)
    }

    /// `part` of a dense tensor of full shape `shape` (all of it for None): only that
    /// part is read from the checkpoint (tensor parallelism).
    pub fn tensor_part(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        part: Option<&Part>,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let tensor = match &*self.checkpoint {
            Checkpoint::Safetensors(st) => {
                let view = st.get(&self.file_name(name)?)?;
                self.check_shape(name, &Shape::from(view.shape()), &shape)?;
                match part {
                    None => st.load(&self.file_name(name)?, &self.device)?,
                    Some(part) => {
                        let dtype = DType::try_from(view.dtype())?;
                        let (bytes, dims) = part.of_bytes(
                            name,
                            view.data(),
                            view.shape(),
                            1,
                            dtype.size_in_bytes(),
                        )?;
                        Tensor::from_raw_buffer(&bytes, dtype, &dims, &self.device)?
                    }
                }
            }
            Checkpoint::Gguf { .. } => {
                let tensor = self.qtensor(name)?.dequantize(&self.device)?;
                self.check_shape(name, tensor.shape(), &shape)?;
                match part {
                    Some(p) => tensor.narrow(p.dim, p.range.start, p.range.len())?,
                    None => tensor,
                }
            }
        };
        tensor.to_dtype(self.dtype)
    }

    /// `part` of the tensor `name` of shape `dims`, in its stored dtype (packed int32,
    /// FP8, f16 scales) on the CPU, for the formats the shard decodes itself.
    pub fn stored_part(&self, name: &str, dims: &[usize], part: Option<&Part>) -> Result<Tensor> {
        let Checkpoint::Safetensors(st) = &*self.checkpoint else {
            bail!("{}: packed weights are read from safetensors checkpoints", self.full_name(name))
        };
        let view = st.get(&self.file_name(name)?)?;
        self.check_shape(name, &Shape::from(view.shape()), &Shape::from(dims))?;
        let dtype = DType::try_from(view.dtype())?;
        let (bytes, dims) = match part {
            None => (view.data().to_vec(), dims.to_vec()),
            Some(part) => part.of_bytes(name, view.data(), dims, 1, dtype.size_in_bytes())?,
        };
        Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu)
    }

    /// The dims of the stored tensor `name`.
    pub fn stored_dims(&self, name: &str) -> Result<Vec<usize>> {
        match &*self.checkpoint {
            Checkpoint::Safetensors(st) => Ok(st.get(&self.file_name(name)?)?.shape().to_vec()),
            Checkpoint::Gguf { .. } => Ok(self.qtensor(name)?.shape().dims().to_vec()),
        }
    }

    /// The weight of a linear layer, `[out, in]`: quantized GGUF tensors stay quantized.
    pub fn matmul_weight(&self, name: &str, shape: impl Into<Shape>) -> Result<QMatMul> {
        self.matmul_weight_part(name, shape, None)
    }

    /// `part` of a linear layer's weight of full shape `shape`. Quantized GGUF rows
    /// split anywhere; columns only at quantization block boundaries.
    pub fn matmul_weight_part(
        &self,
        name: &str,
        shape: impl Into<Shape>,
        part: Option<&Part>,
    ) -> Result<QMatMul> {
        let shape = shape.into();
        match &*self.checkpoint {
            Checkpoint::Safetensors(_) => Ok(QMatMul::Tensor(self.tensor_part(name, shape, part)?)),
            Checkpoint::Gguf { .. } => {
                let qtensor = self.qtensor(name)?;
                self.check_shape(name, qtensor.shape(), &shape)?;
                let qtensor = match part {
                    Some(part) => {
                        let dtype = qtensor.dtype();
                        let data = qtensor.data()?;
                        let (bytes, dims) = part.of_bytes(
                            name,
                            &data,
                            shape.dims(),
                            dtype.block_size(),
                            dtype.type_size(),
                        )?;
                        qtensor_from_ggml(dtype, &bytes, dims, &self.device)?
                    }
                    None => qtensor,
                };
                match QMatMul::from_qtensor(qtensor)? {
                    // Unquantized (F32/F16) GGUF matrices come back dense: use the activation dtype.
                    QMatMul::Tensor(t) => Ok(QMatMul::Tensor(t.to_dtype(self.dtype)?)),
                    quantized => Ok(quantized),
                }
            }
        }
    }

    /// The ggml type of a GGUF tensor (e.g. "Q4_1"); None for safetensors.
    pub fn gguf_dtype(&self, name: &str) -> Option<String> {
        let Checkpoint::Gguf { content, .. } = &*self.checkpoint else {
            return None;
        };
        let info = content.tensor_infos.get(&self.file_name(name).ok()?)?;
        Some(format!("{:?}", info.ggml_dtype))
    }

    /// A GGUF tensor without an HF counterpart (e.g. `rope_freqs.weight`), dequantized;
    /// None when absent or for safetensors.
    pub fn gguf_only_tensor(&self, gguf_name: &str) -> Result<Option<Tensor>> {
        let Checkpoint::Gguf { content, file, .. } = &*self.checkpoint else {
            return Ok(None);
        };
        if !content.tensor_infos.contains_key(gguf_name) {
            return Ok(None);
        }
        let mut file = file
            .lock()
            .map_err(|_| candle_core::Error::msg("GGUF file lock poisoned"))?;
        Ok(Some(
            content
                .tensor(&mut *file, gguf_name, &self.device)?
                .dequantize(&self.device)?,
        ))
    }

    fn qtensor(&self, name: &str) -> Result<QTensor> {
        let Checkpoint::Gguf {
            content,
            file,
            path,
        } = &*self.checkpoint
        else {
            bail!("{name}: not a GGUF checkpoint")
        };
        let file_name = self.file_name(name)?;
        if !content.tensor_infos.contains_key(&file_name) {
            bail!(
                "tensor {file_name} ({}) not found in {}",
                self.full_name(name),
                path.display()
            )
        }
        let mut file = file
            .lock()
            .map_err(|_| candle_core::Error::msg("GGUF file lock poisoned"))?;
        content.tensor(&mut *file, &file_name, &self.device)
    }

    fn check_shape(&self, name: &str, actual: &Shape, expected: &Shape) -> Result<()> {
        if actual != expected {
            bail!(
                "tensor {}: shape {actual:?} in the checkpoint, the config implies {expected:?}",
                self.full_name(name)
            )
        }
        Ok(())
    }
}

/// A contiguous range of one dimension of a tensor: a rank's share under tensor parallelism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// 0 (rows) or 1 (columns).
    pub dim: usize,
    pub range: Range<usize>,
}

impl Part {
    /// This part of the row-major `data` of a tensor of `dims` (1D or 2D) whose rows are
    /// stored in blocks of `block` elements taking `block_bytes` bytes each (1 element
    /// of its size for plain dtypes); returns the bytes and the dims of the part.
    fn of_bytes(
        &self,
        name: &str,
        data: &[u8],
        dims: &[usize],
        block: usize,
        block_bytes: usize,
    ) -> Result<(Vec<u8>, Vec<usize>)> {
        let (rows, cols) = match *dims {
            [] => (1, 1),
            [n] => (n, 1),
            [r, c] => (r, c),
            _ => bail!("{name}: only 1D and 2D tensors can be split, not {dims:?}"),
        };
        let extent = if self.dim == 0 { rows } else { cols };
        if self.dim > 1
            || dims.len() <= self.dim
            || self.range.end > extent
            || self.range.is_empty()
        {
            bail!(
                "{name}: cannot take {:?} of dim {} of {dims:?}",
                self.range,
                self.dim
            )
        }
        let row_bytes = cols / block * block_bytes;
        if data.len() != rows * row_bytes {
            bail!("{name}: {} bytes for {dims:?}", data.len())
        }
        let mut out_dims = dims.to_vec();
        out_dims[self.dim] = self.range.len();
        if self.dim == 0 {
            let bytes = data[self.range.start * row_bytes..self.range.end * row_bytes].to_vec();
            return Ok((bytes, out_dims));
        }
        if !self.range.start.is_multiple_of(block) || !self.range.end.is_multiple_of(block) {
            bail!(
                "{name}: columns {:?} do not fall on the quantization blocks of {block}",
                self.range
            )
        }
        let (from, to) = (
            self.range.start / block * block_bytes,
            self.range.end / block * block_bytes,
        );
        let bytes = data
            .chunks_exact(row_bytes)
            .flat_map(|row| &row[from..to])
            .copied()
            .collect();
        Ok((bytes, out_dims))
    }
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io_err = |what: &Path, e: std::io::Error| {
        candle_core::Error::msg(format!("reading {}: {e}", what.display()))
    };
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("parsing {}: {e}", index.display())))?;
        let Some(map) = json["weight_map"].as_object() else {
            bail!("{} has no weight_map", index.display())
        };
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    if files.is_empty() {
        bail!("{} holds no .safetensors weights", dir.display())
    }
    files.sort();
    Ok(files)
}

/// llama.cpp's name of an HF Llama-family tensor.
fn gguf_name(hf: &str) -> Option<String> {
    let global = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = global {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_gguf() {
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.bias").as_deref(),
            Some("blk.12.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(gguf_name("model.layers.1.unknown.weight"), None);
    }

    #[test]
    fn parts_of_rows_columns_and_blocks() {
        // [3, 4] of u8 elements.
        let data: Vec<u8> = (0..12).collect();
        let rows = Part {
            dim: 0,
            range: 1..3,
        };
        assert_eq!(
            rows.of_bytes("w", &data, &[3, 4], 1, 1).unwrap(),
            ((4..12).collect(), vec![2, 4])
        );
        let cols = Part {
            dim: 1,
            range: 2..4,
        };
        assert_eq!(
            cols.of_bytes("w", &data, &[3, 4], 1, 1).unwrap(),
            (vec![2, 3, 6, 7, 10, 11], vec![3, 2])
        );
        // Blocks of 2 elements in 3 bytes: a row of 4 elements is 6 bytes.
        let data: Vec<u8> = (0..18).collect();
        assert_eq!(
            cols.of_bytes("w", &data, &[3, 4], 2, 3).unwrap(),
            (vec![3, 4, 5, 9, 10, 11, 15, 16, 17], vec![3, 2])
        );
        let split_block = Part {
            dim: 1,
            range: 1..3,
        };
        let err = split_block
            .of_bytes("w", &data, &[3, 4], 2, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("quantization blocks"), "{err}");
        let bias = Part {
            dim: 0,
            range: 2..4,
        };
        assert_eq!(
            bias.of_bytes("b", &[0, 1, 2, 3, 4, 5, 6, 7], &[4], 1, 2)
                .unwrap(),
            (vec![4, 5, 6, 7], vec![2])
        );
        assert!(Part {
            dim: 1,
            range: 0..1
        }
        .of_bytes("b", &[0; 4], &[4], 1, 1)
        .is_err());
    }

    /// Rows and block-aligned columns of a quantized matrix, cut in their quantized
    /// form, dequantize to the same values as the whole matrix's.
    #[test]
    fn quantized_parts_dequantize_like_the_whole() -> Result<()> {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (6, 128), &dev)?;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype)?;
            let whole = q.dequantize(&dev)?;
            let data = q.data()?;
            for part in [Part { dim: 0, range: 2..4 }, Part { dim: 1, range: 64..96 }] {
                let (bytes, dims) = part.of_bytes("w", &data, &[6, 128], dtype.block_size(), dtype.type_size())?;
                let cut = qtensor_from_ggml(dtype, &bytes, dims, &dev)?.dequantize(&dev)?;
                let expected = whole.narrow(part.dim, part.range.start, part.range.len())?;
                let diff = (cut - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert_eq!(diff, 0.0, "{dtype:?} {part:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn missing_safetensors_is_an_error() {
        let dir = std::env::temp_dir().join(format!("shard-weights-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Weights::from_safetensors_dir(&dir, DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no .safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
