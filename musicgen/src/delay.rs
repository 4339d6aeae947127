//! MusicGen's delay pattern: codebook `k` runs `k` steps behind codebook 0,
//! so that one decoder step predicts frame `f` of codebook 0 together with
//! frame `f - k` of codebook `k`, each conditioned on the coarser codebooks
//! of its own frame.
//!
//! With `K` codebooks and `F` frames a delayed sequence has `L = F + K`
//! positions: position 0 holds the start token in every codebook, codebook
//! `k` holds its frames at positions `k + 1 ..= k + F`, and every other
//! position holds the pad token. Generation makes `L - 1` decoder steps.

/// `-1` in a pattern mask: the position is generated, not forced.
pub const FREE: i64 = -1;

/// Whether codebook `k` of a delayed sequence of `len` positions holds a
/// generated code (not the start or a pad token) at position `t`.
pub fn is_free(k: usize, t: usize, len: usize, codebooks: usize) -> bool {
    t > k && t + codebooks <= len + k
}

/// Decoder steps needed for `frames` frames of `codebooks` codebooks.
pub fn steps(frames: usize, codebooks: usize) -> usize {
    frames + codebooks - 1
}

/// Delays `codes` (`K` rows of `F` frames) into a sequence of `F + K`
/// positions, as the decoder reads it.
pub fn delay(codes: &[Vec<u32>], start: u32, pad: u32) -> Vec<Vec<u32>> {
    let k_total = codes.len();
    codes
        .iter()
        .enumerate()
        .map(|(k, row)| {
            let len = row.len() + k_total;
            (0..len)
                .map(|t| {
                    if t == 0 {
                        start
                    } else if is_free(k, t, len, k_total) {
                        row[t - k - 1]
                    } else {
                        pad
                    }
                })
                .collect()
        })
        .collect()
}

/// Reverts [`delay`]: the `F = L - K` frames of each codebook. Rows shorter
/// than `K` positions give no frames.
pub fn undelay(seq: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let k_total = seq.len();
    seq.iter()
        .enumerate()
        .map(|(k, row)| {
            let frames = row.len().saturating_sub(k_total);
            row.iter().skip(k + 1).take(frames).copied().collect()
        })
        .collect()
}

/// Hugging Face's `build_delay_pattern_mask` for one mono batch row:
/// `prompt` holds each codebook's first tokens (all rows the same length);
/// returns the `K x max_length` mask whose entries are a forced token, or
/// [`FREE`] where the model generates.
pub fn pattern_mask(prompt: &[Vec<u32>], pad: u32, max_length: usize) -> Vec<Vec<i64>> {
    let k_total = prompt.len();
    let mut shifted = vec![vec![FREE; max_length]; k_total];
    if max_length < 2 * k_total - 1 {
        return shifted;
    }
    for (k, row) in prompt.iter().enumerate() {
        for (i, &id) in row.iter().enumerate() {
            if let Some(slot) = shifted[k].get_mut(k + i) {
                *slot = i64::from(id);
            }
        }
    }
    for (k, row) in shifted.iter_mut().enumerate() {
        for (t, slot) in row.iter_mut().enumerate() {
            // The lower triangle (before the codebook starts) and the upper
            // one (after it ends) are pads.
            if t <= k || t + k_total > max_length + k {
                *slot = i64::from(pad);
            }
        }
    }
    shifted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_then_undelay_is_the_identity() {
        let codes = vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]];
        let seq = delay(&codes, 99, 98);
        assert_eq!(
            seq,
            vec![
                vec![99, 1, 2, 3, 98, 98],
                vec![99, 98, 4, 5, 6, 98],
                vec![99, 98, 98, 7, 8, 9],
            ]
        );
        assert_eq!(undelay(&seq), codes);
    }

    #[test]
    fn free_positions_are_exactly_the_delayed_frames() {
        let (k_total, frames) = (4, 5);
        let len = frames + k_total;
        for k in 0..k_total {
            let free: Vec<usize> = (0..len).filter(|&t| is_free(k, t, len, k_total)).collect();
            assert_eq!(free, (k + 1..=k + frames).collect::<Vec<_>>());
        }
        assert_eq!(steps(frames, k_total), len - 1);
    }

    #[test]
    fn pattern_mask_matches_the_documented_example() {
        // transformers' docstring: 4 codebooks, max length 8, start token only.
        let p = 2048;
        let mask = pattern_mask(&vec![vec![p]; 4], p, 8);
        let pi = i64::from(p);
        assert_eq!(mask[0], vec![pi, -1, -1, -1, -1, pi, pi, pi]);
        assert_eq!(mask[1], vec![pi, pi, -1, -1, -1, -1, pi, pi]);
        assert_eq!(mask[3], vec![pi, pi, pi, pi, -1, -1, -1, -1]);
    }
}
