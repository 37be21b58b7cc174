//! Between tensors and the wire: a LoRA update as a protocol [`Delta`], and the layout a run
//! expects deltas to have.

use herd_protocol::delta::{Delta, DeltaLayout, DeltaTensor};
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::lora::Lora;

/// The tensors a delta of `lora` carries (its trainable factors), in order.
pub fn delta_layout(lora: &Lora) -> DeltaLayout {
    DeltaLayout(
        lora.trainable_factors()
            .into_iter()
            .map(|(name, t)| (name, t.size().iter().map(|&d| d as u32).collect()))
            .collect(),
    )
}

/// `lora − before` for the trainable factors, as raw fp32. `before` is a snapshot taken with
/// [`Lora::snapshot`] before training.
pub fn lora_delta(before: &[(String, Tensor)], lora: &Lora) -> Result<Delta> {
    let tensors = lora
        .trainable_factors()
        .into_iter()
        .map(|(name, after)| {
            let (_, prev) = before
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| ModelError::Argument(format!("no snapshot of `{name}`")))?;
            let diff = after
                .f_detach()?
                .f_sub(prev)?
                .f_to_kind(Kind::Float)?
                .f_to_device(tch::Device::Cpu)?;
            Ok(DeltaTensor {
                name,
                shape: diff.size().iter().map(|&d| d as u32).collect(),
                values: Vec::<f32>::try_from(diff.f_flatten(0, -1)?)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Delta { tensors })
}
