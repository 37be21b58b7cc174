//! Choosing where tensors live: `auto` (CUDA if present, else CPU), `cpu` or `cuda:N`.

use std::str::FromStr;

use tch::Device;

use crate::error::ModelError;

/// A device as a user names it on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| {
                    ModelError::Argument(format!("device `{s}`: expected auto, cpu or cuda:N"))
                }),
        }
    }
}

impl DeviceChoice {
    /// The device to use; asking for a GPU that is not there is an error, not a silent fallback.
    pub fn resolve(self) -> Result<Device, ModelError> {
        match self {
            DeviceChoice::Auto if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Auto | DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) if n < tch::Cuda::device_count() as usize => Ok(Device::Cuda(n)),
            DeviceChoice::Cuda(n) => Err(ModelError::Argument(format!(
                "cuda:{n} requested but {} CUDA device(s) are visible",
                tch::Cuda::device_count()
            ))),
        }
    }
}
