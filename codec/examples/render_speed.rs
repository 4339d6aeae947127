//! Measures how fast the codec renders: seconds of audio per second of wall time.
//!
//! `cargo run --release -p encore-codec --example render_speed`

use std::time::Instant;

use encore_codec::{FRAME_RATE, HOLD, Instrument, REST, Token, VOCAB_SIZE, Velocity, render};

fn main() -> Result<(), encore_codec::CodecError> {
    // A busy mix of every instrument: notes of one to eight frames, some rests.
    let mut tokens = Vec::new();
    let mut state: u32 = 12345;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    while tokens.len() < 25_000 {
        let instrument = Instrument::ALL[(next() % 8) as usize];
        let pitch = 36 + (next() % 48) as u8;
        let velocity = Velocity::ALL[(next() % 2) as usize];
        tokens.push(Token::note(instrument, pitch, velocity)?.id());
        let holds = (next() % 8) as usize;
        tokens.extend(std::iter::repeat_n(HOLD, holds));
        if next() % 4 == 0 {
            tokens.push(REST);
        }
    }
    debug_assert!(tokens.iter().all(|&t| (t as usize) < VOCAB_SIZE));
    // Warm up (builds the wavetables once).
    render(&tokens[..100])?;
    let start = Instant::now();
    let samples = render(&tokens)?;
    let wall = start.elapsed().as_secs_f64();
    let audio = tokens.len() as f64 / f64::from(FRAME_RATE);
    println!(
        "rendered {audio:.0} s of audio ({} samples) in {wall:.3} s: {:.0}x real time",
        samples.len(),
        audio / wall
    );
    Ok(())
}
