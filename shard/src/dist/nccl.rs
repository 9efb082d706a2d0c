//! Collectives over NCCL for CUDA groups. Rank 0 creates the NCCL unique id and sends it
//! to the others over the TCP rendezvous; the collectives then run on each rank's candle
//! stream, as custom ops over the tensors' device buffers.

use super::{Communicator, TcpGroup};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use std::sync::Arc;

pub struct NcclComm {
    comm: Arc<Comm>,
    device: Device,
    rank: usize,
    world_size: usize,
}

// SAFETY: every collective of a rank runs on its runner thread, in the order all ranks
// share; the NCCL communicator is only touched from there.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins NCCL on `device` (this rank's GPU) with the id rank 0 sends through `group`.
    pub fn new(group: &TcpGroup, device: &Device) -> anyhow::Result<Self> {
        let Device::Cuda(cuda) = device else {
            anyhow::bail!("NCCL needs a CUDA device")
        };
        let own = if group.rank() == 0 {
            let id = Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let shared = group.broadcast(&own)?;
        let internal: [std::ffi::c_char; 128] =
            std::array::from_fn(|i| shared[i] as std::ffi::c_char);
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            group.rank(),
            group.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| anyhow::anyhow!("joining the NCCL group: {e:?}"))?;
        Ok(Self {
            comm: Arc::new(comm),
            device: device.clone(),
            rank: group.rank(),
            world_size: group.world_size(),
        })
    }
}

/// Which collective a `Collective` op runs.
#[derive(Clone, Copy)]
enum Kind {
    AllReduceSum,
    /// Output `[world_size, ..input]`.
    AllGatherStacked,
}

struct Collective {
    comm: Arc<Comm>,
    kind: Kind,
    world_size: usize,
}

impl Collective {
    fn run<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let input = storage.as_cuda_slice::<T>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL collectives take contiguous tensors")
        };
        let input = input.slice(start..end);
        let device = storage.device().clone();
        let (out_len, shape) = match self.kind {
            Kind::AllReduceSum => (end - start, layout.shape().clone()),
            Kind::AllGatherStacked => {
                let mut dims = vec![self.world_size];
                dims.extend_from_slice(layout.dims());
                ((end - start) * self.world_size, Shape::from(dims))
            }
        };
        // SAFETY: NCCL writes every element before anything reads the buffer.
        let mut output: CudaSlice<T> = unsafe { device.alloc::<T>(out_len)? };
        match self.kind {
            Kind::AllReduceSum => self.comm.all_reduce(&input, &mut output, &ReduceOp::Sum),
            Kind::AllGatherStacked => self.comm.all_gather(&input, &mut output),
        }
        .map_err(|e| candle_core::Error::msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(output, device), shape))
    }
}

impl CustomOp1 for Collective {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match storage.dtype() {
            DType::F32 => self.run::<f32>(storage, layout),
            DType::BF16 => self.run::<half::bf16>(storage, layout),
            DType::F16 => self.run::<half::f16>(storage, layout),
            other => candle_core::bail!("NCCL collectives on {other:?} tensors are not supported"),
        }
    }
}

impl NcclComm {
    fn collective(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Collective {
            comm: self.comm.clone(),
            kind,
            world_size: self.world_size,
        })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.collective(x, Kind::AllReduceSum)
    }

    fn all_gather_stacked(&self, x: &Tensor) -> Result<Tensor> {
        self.collective(x, Kind::AllGatherStacked)
    }

    fn barrier(&self) -> Result<()> {
        // A tiny all-reduce, read back so the host waits for it.
        let token = Tensor::zeros(1, DType::F32, &self.device)?;
        self.all_reduce_sum(&token)?.to_vec1::<f32>()?;
        Ok(())
    }
}
