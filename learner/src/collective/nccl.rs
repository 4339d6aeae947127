//! NCCL between CUDA learner ranks (cargo feature `nccl`, part of `cuda`).
//!
//! Bootstrap: rank 0 calls [`Nccl::unique_id`] and reports the 128 bytes to
//! the coordinator (`MemberStatus.nccl_unique_id`), which relays them to
//! every rank in `LearnerAssignment.nccl_unique_id`; then every rank calls
//! [`Nccl::new`] with its rank and device. NCCL itself connects the ranks
//! (over NVLink, PCIe, InfiniBand or sockets, as it finds best).
//!
//! Data path: [`Collective::all_reduce_sum`] takes host `f32` slices, so it
//! copies the slice to a device buffer (kept between calls), all-reduces it
//! in place and copies it back, synchronising the stream before returning.
//! That is the simplest correct path for the trait's host API; a learner
//! whose gradients already live on the GPU calls
//! [`Nccl::all_reduce_sum_device`] on the device buffer and skips both
//! copies.
//!
//! Identical results: NCCL's all-reduce algorithms (ring, tree) compute each
//! element once and then distribute it, so all ranks end with the same
//! bits. Run-to-run reproducibility additionally needs the same algorithm
//! and protocol every time: pin `NCCL_ALGO` and `NCCL_PROTO` in the
//! environment where that matters.
//!
//! Libraries: cudarc loads libcuda and libnccl at run time unless candle's
//! `cuda` feature links them (which it does with `cuda`), so a build with
//! only `nccl` starts on a machine without CUDA and [`Nccl::new`] returns
//! [`CollectiveError::Unsupported`] there. At run time cudarc looks for
//! `libnccl.so` (or `libnccl.so.<CUDA major>`), not NCCL's own soname
//! `libnccl.so.2`: install the NCCL development package or add a
//! `libnccl.so` link on the loader path. cudarc reports a missing library
//! by panicking; this module turns that panic into the error (the panic
//! message still reaches stderr through the panic hook).
//!
//! One rank: every operation still goes through NCCL (a one-rank
//! all-reduce is a device copy), so a single GPU exercises the whole data
//! path; the cost is two host copies of the gradient per step, small next
//! to the step. NCCL refuses two ranks on one GPU ("Duplicate GPU
//! detected"), so the multi-rank path needs a machine with several GPUs.
//!
//! Not covered: NCCL calls here are blocking and have no timeout; a rank
//! whose peer died waits until its process is stopped (the coordinator's
//! lease expiry re-forms the ring).
//!
//! Run on a GPU: `scripts/nccl-check.sh` runs the ignored tests below and
//! `tests/data_parallel.rs`'s NCCL test against the real library.

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};
use cudarc::nccl::{Comm, Id, ReduceOp};
use encore_proto::v1::CollectiveBackend;

use super::{Collective, CollectiveError, NCCL_UNIQUE_ID_BYTES};

/// One rank's NCCL communicator; see the module documentation.
pub struct Nccl {
    comm: Comm,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    /// Device staging for host all-reduces, grown as needed and reused.
    floats: Option<CudaSlice<f32>>,
    /// Why the communicator broke, once it has: after an NCCL error its
    /// state is undefined.
    broken: Option<String>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// on it are not concurrent, which `&mut self` on every operation ensures;
// each operation binds the CUDA context to the calling thread first. The
// raw `ncclComm_t` inside `Comm` is what keeps the auto trait from applying.
unsafe impl Send for Nccl {}

impl Nccl {
    /// A fresh NCCL unique id (`ncclGetUniqueId`), for rank 0 to hand to
    /// the coordinator.
    pub fn unique_id() -> Result<[u8; NCCL_UNIQUE_ID_BYTES], CollectiveError> {
        let id = guard("ncclGetUniqueId", || {
            Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))
        })?;
        // `c_char` is i8 or u8 depending on the platform; the bytes are opaque.
        Ok(id.internal().map(|byte| byte as u8))
    }

    /// Joins the communicator of `world_size` ranks identified by
    /// `unique_id` as `rank`, on CUDA device `device_ordinal`. Blocks until
    /// every rank has joined.
    pub fn new(
        rank: usize,
        world_size: usize,
        unique_id: &[u8; NCCL_UNIQUE_ID_BYTES],
        device_ordinal: usize,
    ) -> Result<Self, CollectiveError> {
        if rank >= world_size {
            return Err(CollectiveError::Config(format!(
                "rank {rank} is out of range for world_size {world_size}"
            )));
        }
        guard("NCCL initialisation", || {
            // Binds the device's primary context to this thread, which
            // ncclCommInitRank uses to pick the device.
            let ctx = CudaContext::new(device_ordinal)
                .map_err(|e| cuda_error(&format!("opening CUDA device {device_ordinal}"), e))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| cuda_error("creating a CUDA stream", e))?;
            let id = Id::uninit(unique_id.map(|byte| byte as c_char));
            let comm = Comm::from_rank(stream.clone(), rank, world_size, id)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
            tracing::info!(rank, world_size, device_ordinal, "nccl communicator formed");
            Ok(Self {
                comm,
                ctx,
                stream,
                rank,
                world_size,
                floats: None,
                broken: None,
            })
        })
    }

    /// The stream collectives are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Sums `buf`, a device buffer of this rank's device, across ranks in
    /// place. The operation is enqueued on [`Nccl::stream`] (cudarc orders
    /// it after the buffer's pending work); this call does not wait for it.
    pub fn all_reduce_sum_device<B: DevicePtrMut<f32>>(
        &mut self,
        buf: &mut B,
    ) -> Result<(), CollectiveError> {
        self.usable()?;
        let result = self.bind().and_then(|()| {
            self.comm
                .all_reduce_in_place(buf, &ReduceOp::Sum)
                .map(drop)
                .map_err(|e| nccl_error("ncclAllReduce", e))
        });
        self.finish(result)
    }

    fn usable(&self) -> Result<(), CollectiveError> {
        match &self.broken {
            Some(reason) => Err(CollectiveError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    fn bind(&self) -> Result<(), CollectiveError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_error("binding the CUDA context", e))
    }

    fn finish<T>(&mut self, result: Result<T, CollectiveError>) -> Result<T, CollectiveError> {
        if let Err(err) = &result {
            self.broken = Some(err.to_string());
        }
        result
    }

    fn host_all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.bind()?;
        let stream = self.stream.clone();
        let too_small = self.floats.as_ref().is_none_or(|d| d.len() < buf.len());
        if too_small {
            self.floats = None;
            let fresh = stream
                .alloc_zeros::<f32>(buf.len())
                .map_err(|e| cuda_error("allocating the all-reduce buffer", e))?;
            self.floats = Some(fresh);
        }
        let Some(device) = self.floats.as_mut() else {
            return Err(CollectiveError::Backend("all-reduce buffer missing".into()));
        };
        let mut view = device.slice_mut(..buf.len());
        stream
            .memcpy_htod(&*buf, &mut view)
            .map_err(|e| cuda_error("copying to the device", e))?;
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce", e))?;
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| cuda_error("copying from the device", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("synchronising the stream", e))
    }

    fn host_broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.bind()?;
        let stream = self.stream.clone();
        // The length first, so that the other ranks can size their buffers.
        let mut len = stream
            .clone_htod(&[buf.len() as u64])
            .map_err(|e| cuda_error("copying to the device", e))?;
        self.comm
            .broadcast_in_place(&mut len, root as i32)
            .map_err(|e| nccl_error("ncclBroadcast", e))?;
        let len = stream
            .clone_dtoh(&len)
            .map_err(|e| cuda_error("copying from the device", e))?;
        let len = usize::try_from(len.first().copied().unwrap_or(0))
            .map_err(|_| CollectiveError::Backend("broadcast length overflows usize".into()))?;
        if self.rank != root {
            buf.clear();
            buf.resize(len, 0);
        }
        if len == 0 {
            return Ok(());
        }
        let mut bytes = stream
            .clone_htod(&buf[..])
            .map_err(|e| cuda_error("copying to the device", e))?;
        self.comm
            .broadcast_in_place(&mut bytes, root as i32)
            .map_err(|e| nccl_error("ncclBroadcast", e))?;
        stream
            .memcpy_dtoh(&bytes, &mut buf[..])
            .map_err(|e| cuda_error("copying from the device", e))?;
        stream
            .synchronize()
            .map_err(|e| cuda_error("synchronising the stream", e))
    }

    fn device_barrier(&mut self) -> Result<(), CollectiveError> {
        // An all-reduce cannot complete on any rank before every rank has
        // contributed, which is all a barrier needs.
        let mut one = [0f32];
        self.host_all_reduce(&mut one)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> CollectiveBackend {
        CollectiveBackend::Nccl
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.usable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let result = guard("ncclAllReduce", || self.host_all_reduce(buf));
        self.finish(result)
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::Config(format!(
                "broadcast root {root} is out of range for world_size {}",
                self.world_size
            )));
        }
        self.usable()?;
        let result = guard("ncclBroadcast", || self.host_broadcast(buf, root));
        self.finish(result)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.usable()?;
        let result = guard("barrier", || self.device_barrier());
        self.finish(result)
    }
}

/// Runs `f`, turning a panic (cudarc's way of reporting that libcuda or
/// libnccl, or a symbol in them, cannot be loaded) into an error.
fn guard<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, CollectiveError>,
) -> Result<T, CollectiveError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(CollectiveError::Unsupported(format!(
            "{what}: the CUDA or NCCL library is unavailable: {message}"
        )))
    })
}

fn nccl_error(what: &str, err: cudarc::nccl::result::NcclError) -> CollectiveError {
    // `NcclError`'s own Debug prints only "NcclError"; the code says more.
    CollectiveError::Backend(format!("{what} failed: {:?}", err.0))
}

fn cuda_error(what: &str, err: cudarc::driver::DriverError) -> CollectiveError {
    CollectiveError::Backend(format!("{what} failed: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without libnccl (every CI box) cudarc panics inside;
    /// the caller must get an error instead. With the libraries present the
    /// id is generated.
    #[test]
    fn a_unique_id_or_a_clean_error() {
        match Nccl::unique_id() {
            Ok(id) => assert!(id.iter().any(|&b| b != 0), "an id is not all zeros"),
            Err(err) => assert!(
                matches!(
                    err,
                    CollectiveError::Unsupported(_) | CollectiveError::Backend(_)
                ),
                "{err}"
            ),
        }
    }

    /// The whole data path of one rank on a real GPU: host all-reduce
    /// (and the staging buffer growing), broadcast, barrier and the device
    /// all-reduce. A one-rank sum is the identity, so every value must come
    /// back bit for bit.
    #[test]
    #[ignore = "needs a CUDA GPU and libnccl (scripts/nccl-check.sh)"]
    fn one_rank_runs_every_operation_on_a_gpu() {
        let id = Nccl::unique_id().expect("ncclGetUniqueId");
        let mut nccl = Nccl::new(0, 1, &id, 0).expect("a one-rank communicator");
        for len in [1usize, 1000, 3_000_017] {
            let want: Vec<f32> = (0..len).map(|i| (i as f32).mul_add(0.5, -7.25)).collect();
            let mut buf = want.clone();
            nccl.all_reduce_sum(&mut buf).expect("host all-reduce");
            assert_eq!(buf, want, "{len} values");
        }
        for message in [&b""[..], b"x", &[7u8; 100_001][..]] {
            let mut bytes = message.to_vec();
            nccl.broadcast(&mut bytes, 0).expect("broadcast");
            assert_eq!(bytes, message);
        }
        nccl.barrier().expect("barrier");
        let want: Vec<f32> = (0..1 << 20).map(|i| i as f32).collect();
        let stream = nccl.stream().clone();
        let mut device = stream.clone_htod(&want).expect("to the device");
        nccl.all_reduce_sum_device(&mut device)
            .expect("device all-reduce");
        let back = stream.clone_dtoh(&device).expect("from the device");
        assert_eq!(back, want);

        // What one rank's host path costs per step for 64 MB of gradient.
        let mut big = vec![1.0f32; 16 << 20];
        let started = std::time::Instant::now();
        for _ in 0..10 {
            nccl.all_reduce_sum(&mut big).expect("64 MB all-reduce");
        }
        let took = started.elapsed().as_secs_f64() / 10.0;
        println!(
            "one rank, 64 MB host all-reduce: {:.2} ms ({:.1} GB/s)",
            took * 1e3,
            64.0 * 1.048_576e6 / took / 1e9
        );
    }

    #[test]
    fn out_of_range_rank_is_refused_before_touching_cuda() {
        let err = Nccl::new(2, 2, &[0; NCCL_UNIQUE_ID_BYTES], 0).expect_err("rank 2 of 2");
        assert!(matches!(err, CollectiveError::Config(_)), "{err}");
    }
}
