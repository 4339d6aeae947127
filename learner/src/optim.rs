//! The optimiser and the gradient plumbing around it.
//!
//! Where it sits: after every micro-batch of a learner step has been
//! backpropagated. The gradients are flattened into one f32 buffer in a
//! fixed variable order ([`flatten_grads`]), all-reduced across ranks by
//! the collective, clipped to a global norm ([`clip_global_norm`]), split
//! back per variable ([`unflatten`]) and applied by [`AdamW::step_with`].
//!
//! [`AdamW`] is candle_nn's AdamW, operation for operation (so the updates
//! are bit-identical to it), with its state out in the open: the learner
//! checkpoint must hold the first and second moments and the step count, or
//! a resumed learner would restart the bias correction and take a few
//! oversized steps. candle_nn keeps that state private.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarMap};

use crate::LearnerError;

/// Name of the step counter in [`AdamW::state_tensors`].
pub const STEP_KEY: &str = "step";
/// Prefix of the first moments in [`AdamW::state_tensors`].
pub const FIRST_MOMENT_PREFIX: &str = "m.";
/// Prefix of the second moments in [`AdamW::state_tensors`].
pub const SECOND_MOMENT_PREFIX: &str = "v.";

/// Every variable of `vars` with its name, sorted by name: the canonical
/// order of the flat gradient buffer, the same on every rank.
pub fn named_vars(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("var map lock poisoned");
    let mut named: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// One optimised variable and its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW with decoupled weight decay, numerically identical to
/// `candle_nn::AdamW`, whose state can be saved and restored exactly.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    step: u64,
    params: ParamsAdamW,
}

impl AdamW {
    /// An optimiser over `vars` with zero moments. Like candle_nn, it
    /// ignores variables that are not floating point. Names must be unique.
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self, LearnerError> {
        let mut slots = Vec::with_capacity(vars.len());
        let mut by_name = HashMap::new();
        for (name, var) in vars {
            if !var.dtype().is_float() {
                continue;
            }
            if by_name.insert(name.clone(), slots.len()).is_some() {
                return Err(LearnerError::StateMismatch(format!(
                    "variable {name}: listed twice"
                )));
            }
            let m = var.zeros_like()?;
            let v = var.zeros_like()?;
            slots.push(Slot { name, var, m, v });
        }
        Ok(Self {
            slots,
            by_name,
            step: 0,
            params,
        })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// The current learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate of the next steps (warm-up schedules).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Steps taken so far (the `t` of the bias correction).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The optimised variables' names, in the order given to [`AdamW::new`].
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// One update from the gradients of a backward pass; variables without
    /// a gradient are left alone (as candle_nn does).
    pub fn step(&mut self, grads: &GradStore) -> Result<(), LearnerError> {
        self.step += 1;
        let coefs = self.coefficients();
        for slot in &mut self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                update(slot, g, &self.params, coefs)?;
            }
        }
        Ok(())
    }

    /// One update from gradients given by variable name, e.g. all-reduced
    /// and clipped ones from [`unflatten`]. Variables not named are left
    /// alone; an unknown name or a wrong shape is an error, and nothing is
    /// updated then.
    pub fn step_with(&mut self, grads: &[(String, Tensor)]) -> Result<(), LearnerError> {
        let mut resolved = Vec::with_capacity(grads.len());
        for (name, g) in grads {
            let &i = self.by_name.get(name).ok_or_else(|| {
                LearnerError::StateMismatch(format!("gradient {name}: no such variable"))
            })?;
            let shape = self.slots[i].var.shape();
            if g.shape() != shape {
                return Err(LearnerError::StateMismatch(format!(
                    "gradient {name}: shape {:?}, variable {:?}",
                    g.dims(),
                    shape.dims()
                )));
            }
            resolved.push((i, g));
        }
        self.step += 1;
        let coefs = self.coefficients();
        for (i, g) in resolved {
            update(&mut self.slots[i], g, &self.params, coefs)?;
        }
        Ok(())
    }

    /// Bias-correction factors `1 / (1 - beta^t)` of the current step.
    fn coefficients(&self) -> (f64, f64) {
        let t = self.step as i32;
        (
            1f64 / (1f64 - self.params.beta1.powi(t)),
            1f64 / (1f64 - self.params.beta2.powi(t)),
        )
    }

    /// The state to checkpoint: `step` (a one-element i64 tensor) and, per
    /// variable `<name>`, `m.<name>` and `v.<name>`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>, LearnerError> {
        let device = self
            .slots
            .first()
            .map_or(Device::Cpu, |s| s.var.device().clone());
        let mut out = Vec::with_capacity(1 + 2 * self.slots.len());
        out.push((
            STEP_KEY.to_owned(),
            Tensor::new(&[self.step as i64], &device)?,
        ));
        for slot in &self.slots {
            out.push((
                format!("{FIRST_MOMENT_PREFIX}{}", slot.name),
                slot.m.clone(),
            ));
            out.push((
                format!("{SECOND_MOMENT_PREFIX}{}", slot.name),
                slot.v.clone(),
            ));
        }
        Ok(out)
    }

    /// Restores state written by [`AdamW::state_tensors`]. Every variable's
    /// moments must be present with its shape, and nothing else; on error
    /// the optimiser is unchanged.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), LearnerError> {
        let step = tensors
            .get(STEP_KEY)
            .ok_or_else(|| LearnerError::StateMismatch(format!("{STEP_KEY}: missing")))?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let step = match step[..] {
            [s] if s >= 0 => s as u64,
            _ => {
                return Err(LearnerError::StateMismatch(format!(
                    "{STEP_KEY}: expected one non-negative value, got {step:?}"
                )));
            }
        };
        let mut expected: HashSet<String> = HashSet::from([STEP_KEY.to_owned()]);
        let mut moments = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let mut pair = Vec::with_capacity(2);
            for prefix in [FIRST_MOMENT_PREFIX, SECOND_MOMENT_PREFIX] {
                let key = format!("{prefix}{}", slot.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| LearnerError::StateMismatch(format!("{key}: missing")))?;
                if t.shape() != slot.var.shape() {
                    return Err(LearnerError::StateMismatch(format!(
                        "{key}: shape {:?}, variable {:?}",
                        t.dims(),
                        slot.var.dims()
                    )));
                }
                pair.push(
                    t.to_dtype(slot.var.dtype())?
                        .to_device(slot.var.device())?
                        .detach(),
                );
                expected.insert(key);
            }
            moments.push(pair);
        }
        let mut unknown: Vec<&String> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(LearnerError::StateMismatch(format!(
                "{}: no such variable in the optimiser",
                unknown[0]
            )));
        }
        for (slot, mut pair) in self.slots.iter_mut().zip(moments) {
            slot.v = pair.pop().expect("two moments");
            slot.m = pair.pop().expect("two moments");
        }
        self.step = step;
        Ok(())
    }
}

/// candle_nn's AdamW update of one variable, in the same operations and
/// order so that results match bit for bit.
fn update(
    slot: &mut Slot,
    g: &Tensor,
    params: &ParamsAdamW,
    (scale_m, scale_v): (f64, f64),
) -> Result<(), LearnerError> {
    let (beta1, beta2) = (params.beta1, params.beta2);
    let lr = params.lr;
    let next_m = ((&slot.m * beta1)? + (g * (1.0 - beta1))?)?;
    let next_v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let m_hat = (&next_m * scale_m)?;
    let v_hat = (&next_v * scale_v)?;
    let next_theta = (slot.var.as_tensor() * (1f64 - lr * params.weight_decay))?;
    let adjusted = (m_hat / (v_hat.sqrt()? + params.eps)?)?;
    let next_theta = (next_theta - (adjusted * lr)?)?;
    slot.var.set(&next_theta)?;
    slot.m = next_m;
    slot.v = next_v;
    Ok(())
}

/// The gradients of `vars` concatenated into one f32 buffer, in the order of
/// `vars`, each flattened row-major. A variable without a gradient
/// contributes zeros, so every rank's buffer has the same layout (and after
/// [`unflatten`] that variable gets a zero gradient, which AdamW still
/// applies: its moments decay and weight decay acts).
pub fn flatten_grads(grads: &GradStore, vars: &[(String, Var)]) -> Result<Vec<f32>, LearnerError> {
    let total = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut flat = Vec::with_capacity(total);
    for (_, var) in vars {
        match grads.get(var.as_tensor()) {
            Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.resize(flat.len() + var.elem_count(), 0.0),
        }
    }
    Ok(flat)
}

/// Splits a buffer from [`flatten_grads`] back into one gradient per
/// variable (on the variable's device and in its dtype), for
/// [`AdamW::step_with`].
pub fn unflatten(
    flat: &[f32],
    vars: &[(String, Var)],
) -> Result<Vec<(String, Tensor)>, LearnerError> {
    let total: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    if flat.len() != total {
        return Err(LearnerError::StateMismatch(format!(
            "gradient buffer: {} values, the variables hold {total}",
            flat.len()
        )));
    }
    let mut offset = 0;
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let n = var.elem_count();
        let t = Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?
            .to_dtype(var.dtype())?;
        out.push((name.clone(), t));
        offset += n;
    }
    Ok(out)
}

/// Scales `flat` in place so its L2 norm is at most `max_norm` and returns
/// the norm before clipping (`MetricPoint.grad_norm`). The scale is
/// `max_norm / (norm + 1e-6)`, as in `encore_model::pretrain::clip_grad_norm`.
/// A non-finite norm is returned without touching the buffer; the caller
/// should skip the step.
pub fn clip_global_norm(flat: &mut [f32], max_norm: f64) -> f64 {
    let norm = flat
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if norm.is_finite() && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        flat.iter_mut().for_each(|x| *x *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_by_hand() {
        let mut g = vec![3.0f32, 4.0];
        let norm = clip_global_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-12);
        let expect = 1.0 / (5.0 + 1e-6);
        assert!(
            (g[0] as f64 - 3.0 * expect).abs() < 1e-6 && (g[1] as f64 - 4.0 * expect).abs() < 1e-6
        );
        let mut small = vec![0.3f32, 0.4];
        assert!((clip_global_norm(&mut small, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(small, vec![0.3, 0.4]);
        let mut bad = vec![f32::NAN, 1.0];
        assert!(clip_global_norm(&mut bad, 1.0).is_nan());
        assert_eq!(bad[1], 1.0);
    }

    #[test]
    fn unflatten_checks_the_length() {
        let v = vec![(
            "a".to_owned(),
            Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        )];
        let err = unflatten(&[0.0; 3], &v).unwrap_err().to_string();
        assert!(err.contains("3 values") && err.contains("hold 4"), "{err}");
    }
}
