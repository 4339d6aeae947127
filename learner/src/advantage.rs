//! Per-sequence advantages from combined rewards: the leave-one-out
//! baseline over each prompt's group of K samples.
//!
//! Where it sits: after [`crate::normalize`] has turned raw scores into one
//! combined reward per rollout, and before [`crate::loss`], which spreads a
//! sequence's advantage over its tokens. A `ScoredBatch` holds whole groups,
//! adjacent and in `sample_index` order, so the rewards arrive as
//! consecutive runs of K.
//!
//! For a group with rewards `R_1..R_K` (K >= 2):
//!
//! ```text
//! A_i = R_i - (1 / (K - 1)) * sum_{j != i} R_j  =  K / (K - 1) * (R_i - mean(R))
//! ```
//!
//! The baseline of a sample does not depend on the sample itself, so the
//! policy gradient stays unbiased (the REINFORCE leave-one-out estimator of
//! Kool et al., 2019, which MusicRL uses); a group's advantages sum to zero.
//! Advantages are *not* whitened (divided by their standard deviation):
//! rewards are already z-scored per reward model by the normaliser, and
//! dividing by a per-group or per-batch standard deviation would reweight
//! prompts by how much their samples happen to differ, and blow up groups
//! whose samples score nearly the same.

use crate::LearnerError;

/// Leave-one-out advantages of `rewards`, laid out as consecutive groups of
/// `group_size` samples of one prompt. Fails if `group_size < 2`, if the
/// length is not a multiple of it, or if a reward is not finite.
pub fn leave_one_out(rewards: &[f64], group_size: usize) -> Result<Vec<f64>, LearnerError> {
    if group_size < 2 {
        return Err(LearnerError::InvalidBatch(format!(
            "group_size: a leave-one-out baseline needs at least 2 samples per group, got {group_size}"
        )));
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(LearnerError::InvalidBatch(format!(
            "rewards: {} rollouts do not split into whole groups of {group_size}",
            rewards.len()
        )));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(LearnerError::InvalidBatch(format!(
            "rewards[{i}]: not finite ({})",
            rewards[i]
        )));
    }
    let others = (group_size - 1) as f64;
    let mut advantages = Vec::with_capacity(rewards.len());
    for group in rewards.chunks_exact(group_size) {
        let sum: f64 = group.iter().sum();
        advantages.extend(group.iter().map(|r| r - (sum - r) / others));
    }
    Ok(advantages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn by_hand_for_two_groups() {
        // Group 1, K = 3: [1, 2, 6]: A_1 = 1 - (2+6)/2 = -3, A_2 = 2 - 7/2 =
        // -1.5, A_3 = 6 - 3/2 = 4.5. Group 2: [0, 0, 3]: -1.5, -1.5, 3.
        let a = leave_one_out(&[1.0, 2.0, 6.0, 0.0, 0.0, 3.0], 3).unwrap();
        close(&a, &[-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]);
        // Each group sums to zero and equals K/(K-1) * (R - mean).
        close(&[a[..3].iter().sum()], &[0.0]);
        close(
            &a[..3],
            &[1.5 * (1.0 - 3.0), 1.5 * (2.0 - 3.0), 1.5 * (6.0 - 3.0)],
        );
    }

    #[test]
    fn pairs_are_the_difference() {
        close(&leave_one_out(&[0.25, -1.0], 2).unwrap(), &[1.25, -1.25]);
    }

    #[test]
    fn equal_rewards_give_zero_advantage() {
        close(&leave_one_out(&[7.0; 4], 4).unwrap(), &[0.0; 4]);
    }

    #[test]
    fn bad_groups_are_rejected() {
        assert!(
            leave_one_out(&[1.0], 1)
                .unwrap_err()
                .to_string()
                .contains("group_size")
        );
        assert!(
            leave_one_out(&[1.0, 2.0, 3.0], 2)
                .unwrap_err()
                .to_string()
                .contains("whole groups")
        );
        let err = leave_one_out(&[1.0, f64::INFINITY], 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rewards[1]"), "{err}");
    }
}
