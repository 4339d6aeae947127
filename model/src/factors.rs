//! The structure of the codec's vocabulary, as features the policy shares
//! across tokens.
//!
//! A note token is (instrument, pitch, velocity); 768 of the 771 ids are
//! notes. Learning each id's embedding and output weight independently means
//! the policy sees any one id rarely (a note onset is under a tenth of the
//! frames). Giving every id the sum of its factors' vectors as well lets what
//! is learnt about "an onset now", "piano" or "pitch 60" transfer across all
//! ids that share it, which is what made pretraining of the small preset fit
//! in minutes on a CPU.

use candle_core::{Device, Tensor};
use encore_codec::{NUM_INSTRUMENTS, NUM_PITCHES, NUM_VELOCITIES, PITCH_LOW, Token, VOCAB_SIZE};

/// Kinds of token: start, rest, hold, note.
const KINDS: usize = 4;
/// Number of factor features: kind, instrument, pitch, velocity.
pub const NUM_FACTORS: usize = KINDS + NUM_INSTRUMENTS + NUM_PITCHES + NUM_VELOCITIES;

/// The factors of token `id`, as indices into `0..NUM_FACTORS`.
fn factors_of(id: u32) -> Vec<usize> {
    match Token::from_id(id) {
        Ok(Token::Bos) | Err(_) => vec![0],
        Ok(Token::Rest) => vec![1],
        Ok(Token::Hold) => vec![2],
        Ok(Token::Note {
            instrument,
            pitch,
            velocity,
        }) => vec![
            3,
            KINDS + instrument.index(),
            KINDS + NUM_INSTRUMENTS + (pitch - PITCH_LOW) as usize,
            KINDS + NUM_INSTRUMENTS + NUM_PITCHES + velocity.index(),
        ],
    }
}

/// The `[VOCAB_SIZE, NUM_FACTORS]` 0/1 matrix whose row `id` marks the
/// factors of token `id`.
pub fn factor_matrix(device: &Device) -> candle_core::Result<Tensor> {
    let mut m = vec![0f32; VOCAB_SIZE * NUM_FACTORS];
    for id in 0..VOCAB_SIZE {
        for f in factors_of(id as u32) {
            m[id * NUM_FACTORS + f] = 1.0;
        }
    }
    Tensor::from_vec(m, (VOCAB_SIZE, NUM_FACTORS), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_have_four_factors_and_specials_one() {
        let m = factor_matrix(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (id, row) in m.iter().enumerate() {
            let ones = row.iter().filter(|&&x| x == 1.0).count();
            assert_eq!(ones, if id < 3 { 1 } else { 4 }, "id {id}");
        }
        // Two notes differing only in velocity share three factors.
        let a = Token::note(
            encore_codec::Instrument::Piano,
            60,
            encore_codec::Velocity::Soft,
        )
        .unwrap()
        .id();
        let b = Token::note(
            encore_codec::Instrument::Piano,
            60,
            encore_codec::Velocity::Loud,
        )
        .unwrap()
        .id();
        let shared = (0..NUM_FACTORS)
            .filter(|&f| m[a as usize][f] == 1.0 && m[b as usize][f] == 1.0)
            .count();
        assert_eq!(shared, 3);
    }
}
