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
