//! Collective communication between the shards of a tensor-parallel group.
//!
//! Every rank of a group runs the same forward passes (the router sends each request to
//! all shards), so every rank calls the same collectives in the same order. Layers hold a
//! `Comm` and call `all_reduce_sum` after row-parallel matmuls and `all_gather` to
//! rebuild vocab-parallel logits; `connect` picks the implementation for the device.

mod cpu;
#[cfg(feature = "nccl")]
mod nccl;

pub use cpu::TcpGroup;

use anyhow::{ensure, Context};
use candle_core::{Device, Result, Tensor};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// The collectives tensor parallelism needs. Results are bit-identical on every rank.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of every rank's `x` (same shape and dtype everywhere).
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// Every rank's `x` (same shape everywhere) stacked in rank order: `[world_size, ..x]`.
    fn all_gather_stacked(&self, x: &Tensor) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A shared handle on the group's communicator.
pub type Comm = Arc<dyn Communicator>;

/// Every rank's `x` concatenated along `dim` in rank order.
pub fn all_gather(comm: &dyn Communicator, x: &Tensor, dim: usize) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    let stacked = comm.all_gather_stacked(x)?;
    let parts = (0..comm.world_size())
        .map(|r| stacked.get(r))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, dim)
}

/// The group of one: every collective is the identity.
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn all_gather_stacked(&self, x: &Tensor) -> Result<Tensor> {
        x.unsqueeze(0)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// This rank's share of `size` items split evenly over the group, None when one rank
/// holds everything (loading then keeps its whole-tensor path); an error names `what`
/// when `size` does not divide.
pub fn even_split(
    comm: &dyn Communicator,
    size: usize,
    what: &str,
) -> Result<Option<Range<usize>>> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(None);
    }
    if !size.is_multiple_of(world) {
        candle_core::bail!("{what} ({size}) is not divisible by the number of shards ({world})")
    }
    let part = size / world;
    Ok(Some(comm.rank() * part..(comm.rank() + 1) * part))
}

/// Where rank 0 waits for the others.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    /// How long ranks wait for each other to show up (rank 0 may still be loading).
    pub timeout: Duration,
}

/// How the ranks of a group exchange tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Through rank 0 over TCP, in host memory (CUDA tensors are copied there and back).
    Tcp,
    /// NCCL between the GPUs (a build with the `nccl` feature).
    Nccl,
}

impl Transport {
    /// NCCL for CUDA devices, TCP on CPU.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cuda() {
            Self::Nccl
        } else {
            Self::Tcp
        }
    }
}

/// Joins the group of `world_size` ranks as `rank` over `transport` (nothing to join
/// for one rank); NCCL's communicator runs on `device`'s stream.
pub fn connect(
    rank: usize,
    world_size: usize,
    rendezvous: Option<&Rendezvous>,
    transport: Transport,
    device: &Device,
) -> anyhow::Result<Comm> {
    ensure!(
        rank < world_size,
        "rank {rank} is not below world size {world_size}"
    );
    if world_size == 1 {
        return Ok(Arc::new(SingleRank));
    }
    let rendezvous =
        rendezvous.context("a tensor-parallel group needs MASTER_ADDR and MASTER_PORT")?;
    let group = TcpGroup::connect(rank, world_size, rendezvous)?;
    match transport {
        Transport::Tcp => Ok(Arc::new(group)),
        #[cfg(feature = "nccl")]
        Transport::Nccl => Ok(Arc::new(nccl::NcclComm::new(&group, device)?)),
        #[cfg(not(feature = "nccl"))]
        Transport::Nccl => {
            let _ = device;
            anyhow::bail!("tensor parallelism on CUDA needs a build with the `nccl` feature")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_is_the_identity() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
        let comm = SingleRank;
        assert_eq!(
            comm.all_reduce_sum(&x)?.to_vec2::<f32>()?,
            x.to_vec2::<f32>()?
        );
        assert_eq!(
            all_gather(&comm, &x, 1)?.to_vec2::<f32>()?,
            x.to_vec2::<f32>()?
        );
        assert_eq!(even_split(&comm, 6, "heads")?, None);
        Ok(())
    }

    #[test]
    fn uneven_split_is_an_error() {
        struct Second;
        impl Communicator for Second {
            fn rank(&self) -> usize {
                1
            }
            fn world_size(&self) -> usize {
                2
            }
            fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
                Ok(x.clone())
            }
            fn all_gather_stacked(&self, x: &Tensor) -> Result<Tensor> {
                x.unsqueeze(0)
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
        }
        assert_eq!(even_split(&Second, 8, "heads").unwrap(), Some(4..8));
        let err = even_split(&Second, 9, "attention heads")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("attention heads (9)") && err.contains("(2)"),
            "{err}"
        );
    }

    #[test]
    fn one_rank_needs_no_rendezvous() {
        let comm = connect(0, 1, None, Transport::Tcp, &Device::Cpu).unwrap();
        assert_eq!((comm.rank(), comm.world_size()), (0, 1));
        assert!(connect(2, 2, None, Transport::Tcp, &Device::Cpu).is_err());
        let err = connect(0, 2, None, Transport::Tcp, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
    }
}
