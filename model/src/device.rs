//! Device selection: `cpu`, or `cuda` / `cuda:N` when built with the `cuda`
//! feature.

use candle_core::Device;

use crate::ModelError;

/// Parses a device name (`cpu`, `cuda`, `cuda:N`) into a candle device.
pub fn device(name: &str) -> Result<Device, ModelError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map_err(|_| {
                    ModelError::Config(format!("device: bad GPU ordinal in {name:?}"))
                })?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => Err(ModelError::Config(format!(
            "device: unknown device {other:?} (cpu, cuda, cuda:N)"
        ))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Config(
        "device: this build has no CUDA support (rebuild with --features cuda)".into(),
    ))
}

/// The environment variable that bounds how long candle's element-wise
/// worker threads spin waiting for work before they sleep.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Makes candle's element-wise CPU workers sleep as soon as they are idle,
/// unless [`SPIN_LIMIT_VAR`] is already set.
///
/// candle runs element-wise ops on its own pool of threads, which spin
/// (25 000 turns by default) between ops, and matrix products on rayon's
/// threads. A decoding step alternates between the two many times, so the
/// spinning workers take cores from the products. On 2 cores, sampling
/// musicgen-small runs 10-20% faster without the spin (paired runs at batch
/// 1, 8 and 32; `docs/musicgen.md`, "Speed").
///
/// # Safety
///
/// It writes the process environment: call it first thing in `main`,
/// before any other thread is started.
pub unsafe fn park_idle_cpu_workers() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: the caller guarantees that no other thread runs yet.
        unsafe { std::env::set_var(SPIN_LIMIT_VAR, "0") };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert!(matches!(device("cpu"), Ok(Device::Cpu)));
        assert!(device("tpu").unwrap_err().to_string().contains("device"));
        assert!(
            device("cuda:x")
                .unwrap_err()
                .to_string()
                .contains("ordinal")
        );
    }
}
