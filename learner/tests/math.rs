//! The learner's numerical core against values computed another way: the
//! policy-gradient loss and its gradients by hand and by finite
//! differences, the split-batch equivalence that data parallelism relies
//! on, and the optimiser against candle_nn's AdamW.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use encore_learner::loss::{Algorithm, KlEstimator, LossConfig, LossInputs, pad_rows, policy_loss};
use encore_learner::optim::{AdamW, clip_global_norm, flatten_grads, named_vars, unflatten};

const CPU: Device = Device::Cpu;

fn ppo(eps: f64, beta: f64) -> LossConfig {
    LossConfig {
        algorithm: Algorithm::Ppo,
        clip_range: eps,
        kl_coef: beta,
        kl_estimator: KlEstimator::K3,
        entropy_coef: 0.0,
    }
}

fn reinforce(eps: f64, beta: f64) -> LossConfig {
    LossConfig {
        algorithm: Algorithm::Reinforce,
        ..ppo(eps, beta)
    }
}

fn mat(rows: &[&[f64]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as f32))
        .collect();
    Tensor::from_vec(flat, (rows.len(), t), &CPU).unwrap()
}

fn vec1(xs: &[f64]) -> Tensor {
    Tensor::from_vec(
        xs.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        xs.len(),
        &CPU,
    )
    .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got}, want {want} (tolerance {tol})"
    );
}

fn assert_rows(what: &str, got: &[Vec<f64>], want: &[&[f64]], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for (j, (&g, &w)) in g.iter().zip(w.iter()).enumerate() {
            assert_close(&format!("{what}[{i}][{j}]"), g, w, tol);
        }
    }
}

/// Loss value and d loss / d logp for the given inputs.
struct Evaluated {
    loss: f64,
    grad: Vec<Vec<f64>>,
    stats: encore_learner::LossStats,
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    cfg: &LossConfig,
    logp: &[&[f64]],
    behaviour: &[&[f64]],
    reference: &[&[f64]],
    advantages: &[f64],
    mask: &[&[f64]],
    global_tokens: f64,
) -> Evaluated {
    let logp = Var::from_tensor(&mat(logp)).unwrap();
    let out = policy_loss(
        cfg,
        &LossInputs {
            log_probs: logp.as_tensor(),
            behaviour_log_probs: &mat(behaviour),
            reference_log_probs: &mat(reference),
            advantages: &vec1(advantages),
            mask: &mat(mask),
            global_tokens,
        },
    )
    .unwrap();
    let grads = out.loss.backward().unwrap();
    let grad = rows(grads.get(logp.as_tensor()).expect("gradient w.r.t. logp"));
    Evaluated {
        loss: out
            .loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grad,
        stats: out.stats,
    }
}

const TOL: f64 = 1e-6;
const LN_1_5: f64 = 0.405_465_108_108_164_4; // ln 1.5
const LN_0_5: f64 = -std::f64::consts::LN_2; // ln 0.5

#[test]
fn on_policy_ratio_is_one_and_gradient_is_minus_advantage_over_n() {
    // Two sequences, the second one token shorter; its padded slot holds
    // NaN, which must not leak into the loss or the gradient.
    let nan = f64::NAN;
    let logp: &[&[f64]] = &[&[-1.0, -2.0, -0.5], &[-0.3, -1.2, nan]];
    let reference: &[&[f64]] = &[&[-1.1, -1.9, -0.5], &[-0.3, -1.0, nan]];
    let mask: &[&[f64]] = &[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]];
    let adv = [2.0, -1.0];
    for cfg in [ppo(0.2, 0.0), reinforce(0.2, 0.0)] {
        // Local batch = global batch: N = 5.
        // loss = -(3 * 2 + 2 * (-1)) / 5 = -0.8; grad = -A / 5.
        let e = evaluate(&cfg, logp, logp, reference, &adv, mask, 5.0);
        assert_close("loss", e.loss, -0.8, TOL);
        assert_rows(
            "grad",
            &e.grad,
            &[&[-0.4, -0.4, -0.4], &[0.2, 0.2, 0.0]],
            TOL,
        );
        assert_close("ratio_mean", e.stats.ratio_mean, 1.0, TOL);
        assert_eq!(e.stats.clip_fraction, 0.0);
        assert_eq!((e.stats.tokens, e.stats.sequences), (5, 2));
        // -mean logp = (1 + 2 + 0.5 + 0.3 + 1.2) / 5 = 1.
        assert_close("neg_log_prob_mean", e.stats.neg_log_prob_mean, 1.0, TOL);
        // k3 summed per sequence, log r - log p = (-0.1, 0.1, 0) and
        // (0, 0.2): k3(d) = e^d - d - 1, mean over the two sequences.
        let k3 = |d: f64| d.exp() - d - 1.0;
        let per_sequence = (k3(-0.1) + k3(0.1) + k3(0.0) + k3(0.2)) / 2.0;
        assert_close("kl_seq_mean", e.stats.kl_seq_mean, per_sequence, TOL);
        assert_close("kl_seq_mean", per_sequence, 0.015705547, 1e-9);
        assert_close("policy_loss", e.stats.policy_loss, -0.8, TOL);
        assert_eq!(e.stats.kl_penalty, 0.0);

        // The same micro-batch as half of a global batch of 10 tokens
        // contributes half the loss and half the gradient.
        let half = evaluate(&cfg, logp, logp, reference, &adv, mask, 10.0);
        assert_close("loss, N = 10", half.loss, -0.4, TOL);
        assert_rows(
            "grad, N = 10",
            &half.grad,
            &[&[-0.2, -0.2, -0.2], &[0.1, 0.1, 0.0]],
            TOL,
        );
    }
}

#[test]
fn ppo_positive_advantage_above_the_clip_range_has_no_gradient() {
    // r = [1.5, 1, 1], eps = 0.2, A = 2 > 0: token 0 is clipped to 1.2.
    let b = [-1.0, -2.0, -0.7];
    let logp = [b[0] + LN_1_5, b[1], b[2]];
    let e = evaluate(
        &ppo(0.2, 0.0),
        &[&logp],
        &[&b],
        &[&b],
        &[2.0],
        &[&[1.0; 3]],
        3.0,
    );
    // loss = -(1.2 * 2 + 1 * 2 + 1 * 2) / 3.
    assert_close("loss", e.loss, -6.4 / 3.0, TOL);
    assert_rows("grad", &e.grad, &[&[0.0, -2.0 / 3.0, -2.0 / 3.0]], TOL);
    assert_eq!(e.grad[0][0], 0.0, "clipped token: exactly no gradient");
    assert_close("clip_fraction", e.stats.clip_fraction, 1.0 / 3.0, TOL);
    assert_close("ratio_mean", e.stats.ratio_mean, 3.5 / 3.0, TOL);
}

#[test]
fn ppo_negative_advantage_clips_below_only() {
    // A = -1, r = [0.5, 1.5, 1]: token 0 is clipped (r < 1 - eps pushes
    // the same way as A); token 1 is not (r > 1 + eps with A < 0 is the
    // side PPO keeps, so a token the policy now over-weights is still
    // pushed down, with gradient -A * r / N).
    let b = [-1.0, -2.0, -0.7];
    let logp = [b[0] + LN_0_5, b[1] + LN_1_5, b[2]];
    let e = evaluate(
        &ppo(0.2, 0.0),
        &[&logp],
        &[&b],
        &[&b],
        &[-1.0],
        &[&[1.0; 3]],
        3.0,
    );
    // loss = -(0.8 * -1 + 1.5 * -1 + 1 * -1) / 3 = 3.3 / 3.
    assert_close("loss", e.loss, 1.1, TOL);
    assert_rows("grad", &e.grad, &[&[0.0, 0.5, 1.0 / 3.0]], TOL);
    assert_close("clip_fraction", e.stats.clip_fraction, 1.0 / 3.0, TOL);
}

#[test]
fn stale_rollout_is_importance_weighted_against_behaviour_log_probs() {
    // Behaviour differs from current: r = exp(logp - logb) = [e^0.1, e^-0.05].
    let logp = [-1.0, -2.0];
    let b = [-1.1, -1.95];
    let r = [0.1f64.exp(), (-0.05f64).exp()];
    // The reference plays no part in the ratio (beta = 0 here).
    let reference = [-3.0, -0.1];
    for cfg in [ppo(0.2, 0.0), reinforce(0.2, 0.0)] {
        let e = evaluate(
            &cfg,
            &[&logp],
            &[&b],
            &[&reference],
            &[3.0],
            &[&[1.0, 1.0]],
            2.0,
        );
        assert_close("loss", e.loss, -3.0 * (r[0] + r[1]) / 2.0, TOL);
        assert_rows("grad", &e.grad, &[&[-1.5 * r[0], -1.5 * r[1]]], TOL);
        assert_close("ratio_mean", e.stats.ratio_mean, (r[0] + r[1]) / 2.0, TOL);
        assert_eq!(e.stats.clip_fraction, 0.0);
    }
}

#[test]
fn reinforce_truncates_the_ratio_from_above_and_keeps_every_gradient() {
    // r = [1.5, 0.5, 1], eps = 0.2, A = 2: weights min(r, 1.2) = [1.2, 0.5, 1].
    let b = [-1.0, -2.0, -0.7];
    let logp = [b[0] + LN_1_5, b[1] + LN_0_5, b[2]];
    let e = evaluate(
        &reinforce(0.2, 0.0),
        &[&logp],
        &[&b],
        &[&b],
        &[2.0],
        &[&[1.0; 3]],
        3.0,
    );
    assert_close("loss", e.loss, -2.0 * (1.2 + 0.5 + 1.0) / 3.0, TOL);
    // Unlike PPO the truncated token still has a gradient, -1.2 * A / N,
    // and nothing is truncated from below.
    assert_rows("grad", &e.grad, &[&[-0.8, -1.0 / 3.0, -2.0 / 3.0]], TOL);
    assert_close("clip_fraction", e.stats.clip_fraction, 1.0 / 3.0, TOL);

    // Negative advantage: same truncation, gradient -min(r, 1.2) * A / N.
    let e = evaluate(
        &reinforce(0.2, 0.0),
        &[&logp],
        &[&b],
        &[&b],
        &[-1.0],
        &[&[1.0; 3]],
        3.0,
    );
    assert_close("loss, A < 0", e.loss, (1.2 + 0.5 + 1.0) / 3.0, TOL);
    assert_rows("grad, A < 0", &e.grad, &[&[0.4, 0.5 / 3.0, 1.0 / 3.0]], TOL);

    // PPO on the same tokens: the first is clipped (no gradient), the
    // second is not (A > 0 and r < 1 - eps is the side PPO keeps).
    let e = evaluate(
        &ppo(0.2, 0.0),
        &[&logp],
        &[&b],
        &[&b],
        &[2.0],
        &[&[1.0; 3]],
        3.0,
    );
    assert_rows("ppo grad", &e.grad, &[&[0.0, -1.0 / 3.0, -2.0 / 3.0]], TOL);
}

#[test]
fn kl_penalty_is_k3_with_gradient_one_minus_exp_of_ref_minus_logp() {
    // A = 0, so only the KL term remains. d = ref - logp = [-0.5, 0.1].
    let logp = [-1.0, -0.2];
    let reference = [-1.5, -0.1];
    let d = [-0.5f64, 0.1];
    let k3: Vec<f64> = d.iter().map(|d| d.exp() - d - 1.0).collect();
    let beta = 0.1;
    let e = evaluate(
        &ppo(0.2, beta),
        &[&logp],
        &[&logp],
        &[&reference],
        &[0.0],
        &[&[1.0, 1.0]],
        2.0,
    );
    assert_close("loss", e.loss, beta * (k3[0] + k3[1]) / 2.0, 1e-7);
    assert_close(
        "kl_penalty",
        e.stats.kl_penalty,
        beta * (k3[0] + k3[1]) / 2.0,
        1e-7,
    );
    assert_close(
        "kl_k3_mean",
        e.stats.kl_k3_mean,
        (k3[0] + k3[1]) / 2.0,
        1e-7,
    );
    // k3 summed over the one sequence.
    assert_close("kl_seq_mean", e.stats.kl_seq_mean, k3[0] + k3[1], TOL);
    let analytic = [
        beta * (1.0 - d[0].exp()) / 2.0,
        beta * (1.0 - d[1].exp()) / 2.0,
    ];
    assert_rows("grad", &e.grad, &[&analytic], 1e-7);

    // Central finite differences of the loss, in f64.
    let fd = finite_difference(&ppo(0.2, beta), &logp, &logp, &reference, 0.0);
    for (i, (fd, a)) in fd.iter().zip(analytic).enumerate() {
        assert_close(&format!("finite difference [{i}]"), *fd, a, 1e-8);
    }
}

/// The softmax of logits `t`.
fn softmax(t: &[f64]) -> Vec<f64> {
    let z: f64 = t.iter().map(|x| x.exp()).sum();
    t.iter().map(|x| x.exp() / z).collect()
}

#[test]
fn k2_penalty_gradient_is_the_reverse_kl_gradient_in_expectation() {
    // One decoder step of a 3-token softmax with logits theta against a
    // fixed reference distribution. Averaged over the token drawn from pi,
    // the k2 penalty's gradient must be beta * dKL(pi || ref)/dtheta; k3's
    // is not (it follows KL(ref || pi)).
    let theta = [1.5f64, -0.4, 0.2];
    let reference = [0.2f64, 0.5, 0.3];
    let kl = |t: &[f64]| -> f64 {
        softmax(t)
            .iter()
            .zip(&reference)
            .map(|(p, r)| p * (p / r).ln())
            .sum()
    };
    let pi = softmax(&theta);
    let beta = 0.3;
    let expected_gradient = |estimator: KlEstimator| -> [f64; 3] {
        let cfg = LossConfig {
            kl_estimator: estimator,
            ..ppo(0.2, beta)
        };
        let mut g = [0.0f64; 3];
        for (y, &p) in pi.iter().enumerate() {
            let (logp, logr) = (p.ln(), reference[y].ln());
            let e = evaluate(
                &cfg,
                &[&[logp]],
                &[&[logp]],
                &[&[logr]],
                &[0.0],
                &[&[1.0]],
                1.0,
            );
            if estimator == KlEstimator::K2 {
                assert_close("k2 loss", e.loss, beta * 0.5 * (logp - logr).powi(2), 1e-6);
                assert_close("k2 grad", e.grad[0][0], beta * (logp - logr), 1e-6);
            }
            for (j, x) in g.iter_mut().enumerate() {
                *x += p * e.grad[0][0] * (f64::from(u8::from(y == j)) - pi[j]);
            }
        }
        g
    };
    let k2 = expected_gradient(KlEstimator::K2);
    let k3 = expected_gradient(KlEstimator::K3);
    let h = 1e-6;
    let mut k3_off = 0.0f64;
    for j in 0..3 {
        let (mut plus, mut minus) = (theta, theta);
        plus[j] += h;
        minus[j] -= h;
        let dkl = (kl(&plus) - kl(&minus)) / (2.0 * h);
        assert_close(
            &format!("k2: d loss / d theta[{j}]"),
            k2[j],
            beta * dkl,
            1e-6,
        );
        k3_off = k3_off.max((k3[j] - beta * dkl).abs());
    }
    assert!(
        k3_off > 1e-2,
        "k3 follows another gradient: {k3:?} vs {k2:?}"
    );
    // The reported KL is k3's with either estimator.
    let d = -0.7f64;
    let cfg = LossConfig {
        kl_estimator: KlEstimator::K2,
        ..ppo(0.2, beta)
    };
    let e = evaluate(
        &cfg,
        &[&[-1.0]],
        &[&[-1.0]],
        &[&[-1.0 + d]],
        &[0.0],
        &[&[1.0]],
        1.0,
    );
    assert_close("kl_k3_mean", e.stats.kl_k3_mean, d.exp() - d - 1.0, 1e-6);
    assert_close("kl_penalty", e.stats.kl_penalty, beta * 0.5 * d * d, 1e-6);
}

#[test]
fn entropy_bonus_gradient_is_the_entropy_gradient_in_expectation() {
    // One decoder step of a 3-token softmax with logits theta. The bonus
    // acts on the sampled token only; averaged over the token drawn from pi
    // (by enumeration), its gradient must be -c * dH/dtheta.
    let theta = [0.3f64, -1.2, 0.8];
    let entropy = |t: &[f64]| -> f64 { -softmax(t).iter().map(|p| p * p.ln()).sum::<f64>() };
    let pi = softmax(&theta);
    let c = 0.05;
    let cfg = LossConfig {
        entropy_coef: c,
        ..ppo(0.2, 0.0)
    };
    let mut expected = [0.0f64; 3];
    for (y, &p) in pi.iter().enumerate() {
        let logp = p.ln();
        // A = 0, on-policy: only the bonus. Its value is c * logp (N = 1).
        let e = evaluate(
            &cfg,
            &[&[logp]],
            &[&[logp]],
            &[&[logp]],
            &[0.0],
            &[&[1.0]],
            1.0,
        );
        assert_close("loss", e.loss, c * logp, 1e-6);
        assert_close("entropy_bonus", e.stats.entropy_bonus, -c * logp, 1e-6);
        // d loss / d logp = -c * (-logp); chain through d logp / d theta_j
        // = [y == j] - pi_j.
        assert_close("grad", e.grad[0][0], c * logp, 1e-6);
        for (j, x) in expected.iter_mut().enumerate() {
            let dlogp = f64::from(u8::from(y == j)) - pi[j];
            *x += p * e.grad[0][0] * dlogp;
        }
    }
    let h = 1e-6;
    for (j, got) in expected.iter().enumerate() {
        let (mut plus, mut minus) = (theta, theta);
        plus[j] += h;
        minus[j] -= h;
        let dh = (entropy(&plus) - entropy(&minus)) / (2.0 * h);
        assert_close(&format!("d loss / d theta[{j}]"), *got, -c * dh, 1e-6);
    }
    // Off by default, and never negative.
    assert_eq!(ppo(0.2, 0.0).entropy_coef, 0.0);
    let bad = LossConfig {
        entropy_coef: -0.1,
        ..ppo(0.2, 0.0)
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("algorithm.entropy_coef")
    );
}

/// d loss / d logp by central differences with every input in f64 (the
/// behaviour log-probs held fixed, as in the learner).
fn finite_difference(
    cfg: &LossConfig,
    logp: &[f64],
    behaviour: &[f64],
    reference: &[f64],
    adv: f64,
) -> Vec<f64> {
    let t = logp.len();
    let f64_row = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (1, t), &CPU).unwrap();
    let value = |logp: &[f64]| -> f64 {
        let out = policy_loss(
            cfg,
            &LossInputs {
                log_probs: &f64_row(logp),
                behaviour_log_probs: &f64_row(behaviour),
                reference_log_probs: &f64_row(reference),
                advantages: &Tensor::new(&[adv], &CPU).unwrap(),
                mask: &f64_row(&vec![1.0; t]),
                global_tokens: t as f64,
            },
        )
        .unwrap();
        out.loss.to_scalar::<f64>().unwrap()
    };
    let h = 1e-5;
    (0..t)
        .map(|i| {
            let mut plus = logp.to_vec();
            let mut minus = logp.to_vec();
            plus[i] += h;
            minus[i] -= h;
            (value(&plus) - value(&minus)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn whole_loss_gradient_matches_finite_differences_away_from_the_clip_edges() {
    // Off-policy ratios inside and outside the clip range, KL on.
    let behaviour = [-1.0, -2.0, -0.7, -1.3, -0.4];
    let logp = [-0.9, -2.6, -0.75, -1.0, -0.4];
    let reference = [-1.2, -1.8, -0.5, -1.3, -0.9];
    for cfg in [ppo(0.2, 0.05), reinforce(0.2, 0.05)] {
        for adv in [1.7, -0.6] {
            let logp_t =
                Var::from_tensor(&Tensor::from_vec(logp.to_vec(), (1, 5), &CPU).unwrap()).unwrap();
            let row = |xs: &[f64]| Tensor::from_vec(xs.to_vec(), (1, 5), &CPU).unwrap();
            let out = policy_loss(
                &cfg,
                &LossInputs {
                    log_probs: logp_t.as_tensor(),
                    behaviour_log_probs: &row(&behaviour),
                    reference_log_probs: &row(&reference),
                    advantages: &Tensor::new(&[adv], &CPU).unwrap(),
                    mask: &row(&[1.0; 5]),
                    global_tokens: 5.0,
                },
            )
            .unwrap();
            let grads = out.loss.backward().unwrap();
            let grad = grads
                .get(logp_t.as_tensor())
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            // The REINFORCE surrogate's value is min(r, 1 + eps) * A, whose
            // derivative is not its gradient (the truncation weight is held
            // constant), so only PPO is compared with differences of the
            // loss value; REINFORCE is compared with its formula.
            let want = match cfg.algorithm {
                Algorithm::Ppo => finite_difference(&cfg, &logp, &behaviour, &reference, adv),
                Algorithm::Reinforce => (0..5)
                    .map(|i| {
                        let r = (logp[i] - behaviour[i]).exp();
                        let d = reference[i] - logp[i];
                        (-r.min(1.2) * adv + 0.05 * (1.0 - d.exp())) / 5.0
                    })
                    .collect(),
            };
            for i in 0..5 {
                assert_close(
                    &format!("{:?} A={adv} grad[{i}]", cfg.algorithm),
                    grad[0][i],
                    want[i],
                    1e-8,
                );
            }
        }
    }
}

#[test]
fn micro_batches_with_the_global_token_count_sum_to_the_whole_batch() {
    // Four sequences of lengths 3, 1, 2, 3 with clipping and KL active;
    // split into two micro-batches of two, as two ranks would.
    let logp = [
        [-1.0, -2.0, -0.5],
        [-0.3, 0.0, 0.0],
        [-1.2, -0.9, 0.0],
        [-0.6, -2.2, -1.4],
    ];
    let behaviour = [
        [-1.3, -2.0, -0.2],
        [-0.3, 0.0, 0.0],
        [-1.0, -1.3, 0.0],
        [-0.6, -2.0, -1.5],
    ];
    let reference = [
        [-1.1, -1.7, -0.6],
        [-0.5, 0.0, 0.0],
        [-1.4, -0.8, 0.0],
        [-0.9, -2.0, -1.0],
    ];
    let mask = [
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0],
        [1.0, 1.0, 0.0],
        [1.0, 1.0, 1.0],
    ];
    let adv = [1.5, -0.5, -1.0, 0.25];
    let n = 9.0;
    let as_rows = |m: &[[f64; 3]]| m.iter().map(|r| r.to_vec()).collect::<Vec<_>>();
    let t = |m: &[[f64; 3]]| mat(&as_rows(m).iter().map(Vec::as_slice).collect::<Vec<_>>());

    for cfg in [ppo(0.2, 0.1), reinforce(0.2, 0.1)] {
        let var = Var::from_tensor(&t(&logp)).unwrap();
        let whole = policy_loss(
            &cfg,
            &LossInputs {
                log_probs: var.as_tensor(),
                behaviour_log_probs: &t(&behaviour),
                reference_log_probs: &t(&reference),
                advantages: &vec1(&adv),
                mask: &t(&mask),
                global_tokens: n,
            },
        )
        .unwrap();
        let whole_grad = rows(whole.loss.backward().unwrap().get(var.as_tensor()).unwrap());

        let mut total: Option<Tensor> = None;
        let mut stats: Option<encore_learner::LossStats> = None;
        for (start, len) in [(0, 2), (2, 2)] {
            let part = policy_loss(
                &cfg,
                &LossInputs {
                    log_probs: &var.as_tensor().narrow(0, start, len).unwrap(),
                    behaviour_log_probs: &t(&behaviour).narrow(0, start, len).unwrap(),
                    reference_log_probs: &t(&reference).narrow(0, start, len).unwrap(),
                    advantages: &vec1(&adv[start..start + len]),
                    mask: &t(&mask).narrow(0, start, len).unwrap(),
                    global_tokens: n,
                },
            )
            .unwrap();
            stats = Some(match stats {
                None => part.stats,
                Some(s) => s.merge(&part.stats),
            });
            total = Some(match total {
                None => part.loss,
                Some(l) => (l + part.loss).unwrap(),
            });
        }
        let total = total.unwrap();
        let split_grad = rows(total.backward().unwrap().get(var.as_tensor()).unwrap());
        let value = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert_close("loss", value(&total), value(&whole.loss), 1e-6);
        let want: Vec<&[f64]> = whole_grad.iter().map(Vec::as_slice).collect();
        assert_rows("grad", &split_grad, &want, 1e-7);
        // Merged statistics equal the whole batch's.
        let (s, w) = (stats.unwrap(), whole.stats);
        assert_eq!((s.tokens, s.sequences), (w.tokens, w.sequences));
        for (name, a, b) in [
            ("loss", s.loss, w.loss),
            ("kl_seq_mean", s.kl_seq_mean, w.kl_seq_mean),
            ("kl_k3_mean", s.kl_k3_mean, w.kl_k3_mean),
            ("clip_fraction", s.clip_fraction, w.clip_fraction),
            ("ratio_mean", s.ratio_mean, w.ratio_mean),
            (
                "neg_log_prob_mean",
                s.neg_log_prob_mean,
                w.neg_log_prob_mean,
            ),
        ] {
            assert_close(name, a, b, 1e-6);
        }
        assert!(w.clip_fraction > 0.0, "the example must exercise clipping");
    }
}

#[test]
fn bad_inputs_are_named() {
    let x = mat(&[&[-1.0, -1.0]]);
    let short = mat(&[&[-1.0]]);
    let adv = vec1(&[1.0]);
    let inputs = LossInputs {
        log_probs: &x,
        behaviour_log_probs: &x,
        reference_log_probs: &short,
        advantages: &adv,
        mask: &x,
        global_tokens: 2.0,
    };
    let err = policy_loss(&ppo(0.2, 0.0), &inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("reference_log_probs"), "{err}");
    let inputs = LossInputs {
        reference_log_probs: &x,
        global_tokens: 0.0,
        ..inputs
    };
    let err = policy_loss(&ppo(0.2, 0.0), &inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("global_tokens"), "{err}");
    let inputs = LossInputs {
        global_tokens: 2.0,
        advantages: &vec1(&[f64::NAN]),
        ..inputs
    };
    let err = policy_loss(&ppo(0.2, 0.0), &inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("advantages[0]"), "{err}");
    let err = policy_loss(
        &ppo(0.0, 0.0),
        &LossInputs {
            advantages: &adv,
            ..inputs
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("clip_range"), "{err}");
}

#[test]
fn pad_rows_pads_with_a_mask() {
    let (values, mask) = pad_rows(&[&[-1.0, -2.0, -3.0], &[-4.0]], &CPU).unwrap();
    assert_eq!(
        rows(&values),
        vec![vec![-1.0, -2.0, -3.0], vec![-4.0, 0.0, 0.0]]
    );
    assert_eq!(rows(&mask), vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]);
}

#[test]
fn loss_backpropagates_into_the_policy_and_a_step_follows_the_advantage() {
    use encore_model::{Preset, TrainablePolicy, embed_captions};
    let model = TrainablePolicy::fresh(&Preset::Tiny.config(), &CPU, 11).unwrap();
    let reference = model.frozen().unwrap();
    let vocab = model.policy.config().vocab_size as u32;
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % vocab).collect();
    let tokens = Tensor::from_vec(ids, (2, 8), &CPU).unwrap();
    let text = embed_captions(&["calm solo piano, slow", "fast drums in E minor"], &CPU).unwrap();
    let mask = Tensor::ones((2, 8), DType::F32, &CPU).unwrap();
    let adv = vec1(&[1.0, -1.0]);
    let cfg = ppo(0.2, 0.1);

    let logp = model.policy.log_probs(&tokens, &text).unwrap();
    let behaviour = logp.detach();
    let ref_logp = reference.log_probs(&tokens, &text).unwrap();
    let out = policy_loss(
        &cfg,
        &LossInputs {
            log_probs: &logp,
            behaviour_log_probs: &behaviour,
            reference_log_probs: &ref_logp,
            advantages: &adv,
            mask: &mask,
            global_tokens: 16.0,
        },
    )
    .unwrap();
    // Current = reference: no KL yet.
    assert!(
        out.stats.kl_k3_mean.abs() < 1e-6 && out.stats.kl_seq_mean.abs() < 1e-4,
        "{:?}",
        out.stats
    );
    let grads = out.loss.backward().unwrap();
    let vars = named_vars(&model.vars);
    let mut flat = flatten_grads(&grads, &vars).unwrap();
    assert!(flat.iter().all(|g| g.is_finite()));
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Parameters all along the path, from the output head down to the
        // caption conditioning, receive gradient: no op without a backward
        // pass cuts the graph.
        if name.ends_with("qkv.weight") || name.starts_with("head") || name.starts_with("cond") {
            assert!(norm > 0.0, "{name}: zero gradient");
        }
    }
    clip_global_norm(&mut flat, 1.0);
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: 1e-3,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step_with(&unflatten(&flat, &vars).unwrap()).unwrap();

    let after = model.policy.log_probs(&tokens, &text).unwrap();
    let seq = |t: &Tensor| t.sum(1).unwrap().to_vec1::<f32>().unwrap();
    let (before, after) = (seq(&logp), seq(&after));
    assert!(
        after[0] > before[0],
        "A > 0: log-prob should rise: {before:?} -> {after:?}"
    );
    assert!(
        after[1] < before[1],
        "A < 0: log-prob should fall: {before:?} -> {after:?}"
    );
}

// ---------------------------------------------------------------------------
// Optimiser.

/// Three variables of different shapes with deterministic values.
fn make_vars() -> Vec<(String, Var)> {
    [("a", vec![4, 3]), ("b", vec![5]), ("c", vec![2, 2, 2])]
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 31 + k * 7) as f32 * 0.37).sin())
                .collect();
            (name.to_owned(), Var::from_vec(values, shape, &CPU).unwrap())
        })
        .collect()
}

fn copies(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// A loss whose gradient changes with the weights and differs per step:
/// sum_k sum (w_k * c)^2 + sum w_k * d_step, skipping "c" when asked.
fn loss_of(vars: &[(String, Var)], step: usize, skip_c: bool) -> Tensor {
    let mut total = Tensor::new(0f32, &CPU).unwrap();
    for (name, var) in vars {
        if skip_c && name == "c" {
            continue;
        }
        let w = var.as_tensor();
        let n = w.elem_count();
        let c: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32 * 0.11).cos()).collect();
        let d: Vec<f32> = (0..n)
            .map(|i| ((i + step * 3) as f32 * 0.7).sin())
            .collect();
        let c = Tensor::from_vec(c, w.shape(), &CPU).unwrap();
        let d = Tensor::from_vec(d, w.shape(), &CPU).unwrap();
        let term = ((w * &c).unwrap().sqr().unwrap().sum_all().unwrap()
            + (w * &d).unwrap().sum_all().unwrap())
        .unwrap();
        total = (total + term).unwrap();
    }
    total
}

fn values(vars: &[(String, Var)]) -> Vec<f32> {
    vars.iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.05,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    }
}

#[test]
fn adamw_matches_candle_nn() {
    let ours_vars = make_vars();
    let theirs_vars = copies(&ours_vars);
    let mut ours = AdamW::new(ours_vars.clone(), params()).unwrap();
    let mut theirs = candle_nn::AdamW::new(
        theirs_vars.iter().map(|(_, v)| v.clone()).collect(),
        params(),
    )
    .unwrap();
    for step in 0..6 {
        if step == 3 {
            ours.set_learning_rate(0.01);
            theirs.set_learning_rate(0.01);
        }
        ours.step(&loss_of(&ours_vars, step, false).backward().unwrap())
            .unwrap();
        theirs
            .step(&loss_of(&theirs_vars, step, false).backward().unwrap())
            .unwrap();
        let diff = max_diff(&values(&ours_vars), &values(&theirs_vars));
        assert!(diff <= 1e-6, "step {step}: max difference {diff}");
    }
    assert_eq!(ours.step_count(), 6);
    // The weights moved: the comparison is not between two idle optimisers.
    assert!(max_diff(&values(&ours_vars), &values(&make_vars())) > 0.05);
}

#[test]
fn flattened_gradients_step_like_the_grad_store() {
    let direct_vars = make_vars();
    let flat_vars = copies(&direct_vars);
    let mut direct = AdamW::new(direct_vars.clone(), params()).unwrap();
    let mut via_flat = AdamW::new(flat_vars.clone(), params()).unwrap();
    for step in 0..4 {
        direct
            .step(&loss_of(&direct_vars, step, false).backward().unwrap())
            .unwrap();
        let grads = loss_of(&flat_vars, step, false).backward().unwrap();
        let flat = flatten_grads(&grads, &flat_vars).unwrap();
        assert_eq!(flat.len(), 12 + 5 + 8);
        via_flat
            .step_with(&unflatten(&flat, &flat_vars).unwrap())
            .unwrap();
        assert_eq!(values(&direct_vars), values(&flat_vars), "step {step}");
    }
}

#[test]
fn flatten_lays_out_in_variable_order_with_zeros_for_missing_gradients() {
    let vars = make_vars();
    let grads = loss_of(&vars, 0, true).backward().unwrap();
    let flat = flatten_grads(&grads, &vars).unwrap();
    let a = grads
        .get(vars[0].1.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(&flat[..12], &a[..]);
    assert!(flat[12..17].iter().any(|&g| g != 0.0));
    assert!(flat[17..].iter().all(|&g| g == 0.0), "c has no gradient");
    let back = unflatten(&flat, &vars).unwrap();
    assert_eq!(back[2].1.dims(), &[2, 2, 2]);
    assert_eq!(
        back[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        a
    );
}

#[test]
fn adamw_state_restores_exactly() {
    let vars = make_vars();
    let mut opt = AdamW::new(vars.clone(), params()).unwrap();
    for step in 0..3 {
        opt.step(&loss_of(&vars, step, false).backward().unwrap())
            .unwrap();
    }
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert_eq!(state.len(), 1 + 2 * 3);

    // A restarted learner: weights from the checkpoint, optimiser state
    // loaded; both continue identically.
    let resumed_vars = copies(&vars);
    let mut resumed = AdamW::new(resumed_vars.clone(), params()).unwrap();
    resumed.load_state(&state).unwrap();
    assert_eq!(resumed.step_count(), 3);
    for step in 3..6 {
        opt.step(&loss_of(&vars, step, false).backward().unwrap())
            .unwrap();
        resumed
            .step(&loss_of(&resumed_vars, step, false).backward().unwrap())
            .unwrap();
    }
    assert_eq!(values(&vars), values(&resumed_vars));

    // Without the state, the resumed run would differ (bias correction
    // restarts): the test above could fail.
    let fresh_vars = copies(&resumed_vars);
    let mut fresh = AdamW::new(fresh_vars.clone(), params()).unwrap();
    fresh
        .step(&loss_of(&fresh_vars, 6, false).backward().unwrap())
        .unwrap();
    resumed
        .step(&loss_of(&resumed_vars, 6, false).backward().unwrap())
        .unwrap();
    assert!(max_diff(&values(&fresh_vars), &values(&resumed_vars)) > 1e-4);
}

#[test]
fn adamw_rejects_state_that_does_not_fit() {
    let vars = make_vars();
    let mut opt = AdamW::new(vars.clone(), params()).unwrap();
    opt.step(&loss_of(&vars, 0, false).backward().unwrap())
        .unwrap();
    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();

    let mut target = AdamW::new(copies(&vars), params()).unwrap();
    let mut missing = state.clone();
    missing.remove("v.b");
    let err = target.load_state(&missing).unwrap_err().to_string();
    assert!(err.contains("v.b: missing"), "{err}");
    let mut wrong = state.clone();
    wrong.insert(
        "m.a".into(),
        Tensor::zeros((3, 4), DType::F32, &CPU).unwrap(),
    );
    let err = target.load_state(&wrong).unwrap_err().to_string();
    assert!(err.contains("m.a") && err.contains("shape"), "{err}");
    let mut extra = state.clone();
    extra.insert("m.zz".into(), Tensor::zeros(1, DType::F32, &CPU).unwrap());
    let err = target.load_state(&extra).unwrap_err().to_string();
    assert!(err.contains("m.zz"), "{err}");
    assert_eq!(target.step_count(), 0, "a failed load changes nothing");
    let err = target
        .step_with(&[("nope".into(), Tensor::zeros(1, DType::F32, &CPU).unwrap())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
    assert_eq!(target.step_count(), 0);
}
