//! Collectives over TCP for CPU groups (and the rendezvous NCCL starts from).
//!
//! A star through rank 0: rank 0 listens on MASTER_ADDR:MASTER_PORT, the others connect
//! (retrying while rank 0 starts up). In a collective every rank sends its tensor to
//! rank 0 as f32 bytes; rank 0 combines them in rank order and sends the one result back,
//! so every rank gets bit-identical values whatever the arrival order.

use super::{Communicator, Rendezvous};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Result, Tensor};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First word of the hello and of every message: catches a stray peer speaking another protocol.
const MAGIC: u32 = 0x5447_4950;
/// How long a connected peer may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// What a message is for: ranks calling different collectives are out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduceSum = 1,
    AllGather = 2,
    Barrier = 3,
    Broadcast = 4,
}

/// One rank's end of a TCP group.
pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    links: Mutex<Links>,
}

struct Links {
    /// Rank 0: the streams of ranks 1.. in rank order; the others: the stream to rank 0.
    peers: Vec<TcpStream>,
    /// Set by the first failed exchange: the group cannot get back in step after one.
    broken: Option<String>,
}

impl TcpGroup {
    /// Joins the group: rank 0 waits for every other rank, the others connect to it.
    pub fn connect(
        rank: usize,
        world_size: usize,
        rendezvous: &Rendezvous,
    ) -> anyhow::Result<Self> {
        ensure!(
            rank < world_size,
            "rank {rank} is not below world size {world_size}"
        );
        let address = (rendezvous.master_addr.as_str(), rendezvous.master_port);
        let deadline = Instant::now() + rendezvous.timeout;
        let peers = if rank == 0 {
            let listener = TcpListener::bind(address).with_context(|| {
                format!(
                    "rank 0 listening on {}:{}",
                    rendezvous.master_addr, rendezvous.master_port
                )
            })?;
            accept_ranks(&listener, world_size, deadline)?
        } else {
            vec![join_rank_0(address, rank, world_size, deadline)?]
        };
        tracing::info!(rank, world_size, "joined the tensor-parallel group");
        Ok(Self {
            rank,
            world_size,
            links: Mutex::new(Links {
                peers,
                broken: None,
            }),
        })
    }

    /// Rank 0's `bytes` on every rank (the others' `bytes` are ignored).
    pub fn broadcast(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let own = if self.rank == 0 {
            bytes.to_vec()
        } else {
            Vec::new()
        };
        self.exchange(Op::Broadcast, own, |mut all| Ok(all.swap_remove(0)))
    }

    /// Sends `own` to rank 0, which combines every rank's bytes (in rank order) with
    /// `combine`; returns the combined bytes on every rank.
    fn exchange(
        &self,
        op: Op,
        own: Vec<u8>,
        combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut links = self
            .links
            .lock()
            .map_err(|_| candle_core::Error::msg("tensor-parallel group lock poisoned"))?;
        if let Some(reason) = &links.broken {
            candle_core::bail!("the tensor-parallel group failed earlier: {reason}")
        }
        let result = if self.rank == 0 {
            exchange_as_root(&mut links.peers, op, own, combine)
        } else {
            exchange_as_peer(&mut links.peers[0], op, &own)
        };
        result.map_err(|e| {
            let reason = format!("rank {}: {e:#}", self.rank);
            // Closing the links fails the other ranks' pending and later exchanges too,
            // instead of leaving them waiting for an answer that never comes.
            for peer in &links.peers {
                let _ = peer.shutdown(Shutdown::Both);
            }
            links.broken = Some(reason.clone());
            candle_core::Error::msg(reason)
        })
    }
}

impl Communicator for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let summed = self.exchange(Op::AllReduceSum, f32_bytes(x)?, |all| {
            let len = same_len(&all)?;
            // In rank order, so the rounding does not depend on arrival.
            let mut acc = vec![0f32; len / 4];
            for bytes in &all {
                for (a, v) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
                    *a += f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                }
            }
            Ok(acc.iter().flat_map(|v| v.to_le_bytes()).collect())
        })?;
        from_f32_bytes(&summed, x.dims(), x)
    }

    fn all_gather_stacked(&self, x: &Tensor) -> Result<Tensor> {
        let gathered = self.exchange(Op::AllGather, f32_bytes(x)?, |all| {
            same_len(&all)?;
            Ok(all.concat())
        })?;
        let mut dims = vec![self.world_size];
        dims.extend_from_slice(x.dims());
        from_f32_bytes(&gathered, &dims, x)
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Op::Barrier, Vec::new(), |_| Ok(Vec::new()))?;
        Ok(())
    }
}

fn f32_bytes(x: &Tensor) -> Result<Vec<u8>> {
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A tensor of `dims` from f32 bytes, in `like`'s dtype and on its device.
fn from_f32_bytes(bytes: &[u8], dims: &[usize], like: &Tensor) -> Result<Tensor> {
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
        .collect();
    Tensor::from_vec(values, dims, like.device())?.to_dtype(like.dtype())
}

fn same_len(all: &[Vec<u8>]) -> Result<usize> {
    let len = all[0].len();
    if let Some((rank, other)) = all.iter().enumerate().find(|(_, b)| b.len() != len) {
        candle_core::bail!(
            "rank {rank} sent {} values, rank 0 {}: shapes differ across ranks",
            other.len() / 4,
            len / 4
        )
    }
    Ok(len)
}

fn exchange_as_root(
    peers: &mut [TcpStream],
    op: Op,
    own: Vec<u8>,
    combine: impl FnOnce(Vec<Vec<u8>>) -> Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let mut all = vec![own];
    for (i, peer) in peers.iter_mut().enumerate() {
        all.push(read_message(peer, op).with_context(|| format!("receiving from rank {}", i + 1))?);
    }
    let result = combine(all)?;
    for (i, peer) in peers.iter_mut().enumerate() {
        write_message(peer, op, &result).with_context(|| format!("sending to rank {}", i + 1))?;
    }
    Ok(result)
}

fn exchange_as_peer(root: &mut TcpStream, op: Op, own: &[u8]) -> anyhow::Result<Vec<u8>> {
    write_message(root, op, own).context("sending to rank 0")?;
    read_message(root, op).context("receiving from rank 0")
}

/// `MAGIC`, op, payload length (u64), payload; little endian.
fn write_message(stream: &mut TcpStream, op: Op, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 13];
    header[..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4] = op as u8;
    header[5..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)
}

fn read_message(stream: &mut TcpStream, op: Op) -> anyhow::Result<Vec<u8>> {
    let mut header = [0u8; 13];
    stream
        .read_exact(&mut header)
        .map_err(|e| peer_error(e, "the peer left the group"))?;
    ensure!(
        u32::from_le_bytes(header[..4].try_into()?) == MAGIC,
        "garbled message"
    );
    ensure!(
        header[4] == op as u8,
        "ranks out of step: expected {op:?}, the peer sent op {}",
        header[4]
    );
    let len = u64::from_le_bytes(header[5..].try_into()?) as usize;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(|e| peer_error(e, "the peer left mid-message"))?;
    Ok(payload)
}

fn peer_error(e: std::io::Error, eof: &str) -> anyhow::Error {
    if e.kind() == ErrorKind::UnexpectedEof {
        anyhow::anyhow!("{eof}")
    } else {
        e.into()
    }
}

/// Rank 0: accepts ranks 1..world_size, in any order, until `deadline`.
fn accept_ranks(
    listener: &TcpListener,
    world_size: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let mut peers: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> =
                        (1..world_size).filter(|r| peers[r - 1].is_none()).collect();
                    bail!("ranks {missing:?} did not join the tensor-parallel group in time")
                }
                std::thread::sleep(CONNECT_RETRY);
                continue;
            }
            Err(e) => return Err(e).context("accepting a rank"),
        };
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let mut hello = [0u8; 12];
        stream
            .read_exact(&mut hello)
            .context("reading a rank's hello")?;
        let word = |i: usize| u32::from_le_bytes(hello[i * 4..i * 4 + 4].try_into().unwrap());
        let (rank, their_world) = (word(1) as usize, word(2) as usize);
        ensure!(
            word(0) == MAGIC,
            "a connection that is no shard reached MASTER_PORT"
        );
        ensure!(
            their_world == world_size,
            "rank {rank} believes in {their_world} shards, rank 0 in {world_size}"
        );
        ensure!(
            (1..world_size).contains(&rank) && peers[rank - 1].is_none(),
            "unexpected or duplicate rank {rank}"
        );
        stream.set_read_timeout(None)?;
        peers[rank - 1] = Some(stream);
    }
    let mut peers: Vec<TcpStream> = peers.into_iter().flatten().collect();
    // Everyone is in: release the others.
    for peer in &mut peers {
        peer.write_all(&MAGIC.to_le_bytes())?;
    }
    Ok(peers)
}

/// Ranks 1..: connects to rank 0 (retrying until `deadline`), says who it is and waits
/// for the whole group to be in.
fn join_rank_0(
    address: (&str, u16),
    rank: usize,
    world_size: usize,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    let mut stream = loop {
        match TcpStream::connect(address) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "rank {rank} connecting to rank 0 at {}:{}",
                        address.0, address.1
                    )
                })
            }
            Err(_) => std::thread::sleep(CONNECT_RETRY),
        }
    };
    stream.set_nodelay(true)?;
    let hello: Vec<u8> = [MAGIC, rank as u32, world_size as u32]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    stream.write_all(&hello)?;
    stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(HELLO_TIMEOUT),
    ))?;
    let mut ack = [0u8; 4];
    stream
        .read_exact(&mut ack)
        .context("waiting for the other ranks to join")?;
    ensure!(u32::from_le_bytes(ack) == MAGIC, "rank 0 answered garbage");
    stream.set_read_timeout(None)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::net::TcpListener;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Runs `f` on every rank of a fresh group of `world_size` threads.
    fn on_ranks<T: Send + 'static>(
        world_size: usize,
        f: impl Fn(TcpGroup) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let rendezvous = Rendezvous {
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            timeout: Duration::from_secs(20),
        };
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let rendezvous = rendezvous.clone();
                std::thread::spawn(move || {
                    f(TcpGroup::connect(rank, world_size, &rendezvous).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        let results = on_ranks(3, |group| {
            let r = group.rank() as f32;
            let x = Tensor::new(&[[r, 1.], [2. * r, 0.5]], &Device::Cpu).unwrap();
            let sum = group.all_reduce_sum(&x).unwrap().to_vec2::<f32>().unwrap();
            let gathered = super::super::all_gather(&group, &x.narrow(1, 0, 1).unwrap(), 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            group.barrier().unwrap();
            let id = group.broadcast(&[group.rank() as u8 + 7]).unwrap();
            (sum, gathered, id)
        });
        for (sum, gathered, id) in results {
            assert_eq!(sum, vec![vec![3., 3.], vec![6., 1.5]]);
            assert_eq!(gathered, vec![vec![0., 1., 2.], vec![0., 2., 4.]]);
            assert_eq!(id, vec![7]);
        }
    }

    #[test]
    fn bf16_round_trips() {
        let results = on_ranks(2, |group| {
            let x = Tensor::new(&[1.5f32, -2.], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let y = group.all_reduce_sum(&x).unwrap();
            (
                y.dtype(),
                y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            )
        });
        for (dtype, values) in results {
            assert_eq!((dtype, values), (DType::BF16, vec![3., -4.]));
        }
    }

    #[test]
    fn mismatched_shapes_and_a_departed_peer_are_errors() {
        let results = on_ranks(2, |group| {
            let x = Tensor::zeros(group.rank() + 1, DType::F32, &Device::Cpu).unwrap();
            let first = group
                .all_reduce_sum(&x)
                .map(|_| ())
                .map_err(|e| e.to_string());
            if group.rank() == 1 {
                drop(group);
                return (first, Ok(()));
            }
            // Rank 0 failed the first call: the group is broken from then on.
            let second = group.barrier().map_err(|e| e.to_string());
            (first, second)
        });
        let root_error = results[0].0.clone().unwrap_err();
        assert!(root_error.contains("shapes differ"), "{root_error}");
        assert!(results[0].1.clone().unwrap_err().contains("failed earlier"));
        // Rank 1 never got an answer: rank 0 left the exchange without sending one.
        assert!(results[1].0.is_err());
    }

    #[test]
    fn a_missing_rank_times_out() {
        let rendezvous = Rendezvous {
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            timeout: Duration::from_millis(300),
        };
        let err = TcpGroup::connect(0, 2, &rendezvous)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("[1]") && err.contains("in time"), "{err}");
    }
}
