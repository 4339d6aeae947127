//! WAV output: 16-bit PCM mono at `SAMPLE_RATE`, to a file or into memory.

use std::io::{Cursor, Seek, Write};
use std::path::Path;

use hound::{SampleFormat, WavSpec, WavWriter};

use crate::{CodecError, SAMPLE_RATE};

fn spec() -> WavSpec {
    spec_at(SAMPLE_RATE)
}

fn spec_at(sample_rate: u32) -> WavSpec {
    WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: SampleFormat::Int,
    }
}

/// Rejects NaN and infinite samples, naming the first one.
fn check_finite(samples: &[f32]) -> Result<(), CodecError> {
    match samples.iter().position(|s| !s.is_finite()) {
        Some(index) => Err(CodecError::NonFiniteSample {
            index,
            value: samples[index],
        }),
        None => Ok(()),
    }
}

fn write_samples<W: Write + Seek>(
    writer: &mut WavWriter<W>,
    samples: &[f32],
) -> Result<(), hound::Error> {
    let mut pcm = writer.get_i16_writer(samples.len() as u32);
    for &s in samples {
        pcm.write_sample((s.clamp(-1.0, 1.0) * f32::from(i16::MAX)).round() as i16);
    }
    pcm.flush()
}

/// Writes `samples` (clamped to `[-1, 1]`) to `path` as a 16-bit mono WAV at
/// `SAMPLE_RATE`.
pub fn write_wav(path: &Path, samples: &[f32]) -> Result<(), CodecError> {
    write_wav_at(path, samples, SAMPLE_RATE)
}

/// Writes `samples` (clamped to `[-1, 1]`) to `path` as a 16-bit mono WAV at
/// `sample_rate` Hz: for audio from other codecs (MusicGen's EnCodec).
pub fn write_wav_at(path: &Path, samples: &[f32], sample_rate: u32) -> Result<(), CodecError> {
    check_finite(samples)?;
    let file_err = |source| CodecError::WavFile {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = WavWriter::create(path, spec_at(sample_rate)).map_err(file_err)?;
    write_samples(&mut writer, samples).map_err(file_err)?;
    writer.finalize().map_err(file_err)
}

/// Encodes `samples` (clamped to `[-1, 1]`) as the bytes of a 16-bit mono WAV
/// at `SAMPLE_RATE`, for serving audio without touching disk.
pub fn wav_bytes(samples: &[f32]) -> Result<Vec<u8>, CodecError> {
    check_finite(samples)?;
    let mut cursor = Cursor::new(Vec::with_capacity(44 + 2 * samples.len()));
    let mut writer = WavWriter::new(&mut cursor, spec())?;
    write_samples(&mut writer, samples)?;
    writer.finalize()?;
    Ok(cursor.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HOLD, Instrument, REST, SAMPLES_PER_FRAME, Token, Velocity, render};

    fn clip() -> Vec<u32> {
        let n = Token::note(Instrument::Trumpet, 64, Velocity::Loud)
            .unwrap()
            .id();
        vec![n, HOLD, HOLD, REST, n, HOLD, REST]
    }

    fn read_back(reader: hound::WavReader<impl std::io::Read>) -> (WavSpec, Vec<i16>) {
        let spec = reader.spec();
        let samples = reader
            .into_samples::<i16>()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (spec, samples)
    }

    #[test]
    fn wav_file_has_the_right_spec_and_length() {
        let tokens = clip();
        let samples = render(&tokens).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.wav");
        write_wav(&path, &samples).unwrap();
        let (spec, pcm) = read_back(hound::WavReader::open(&path).unwrap());
        assert_eq!(spec, super::spec());
        assert_eq!(spec.sample_rate, SAMPLE_RATE);
        assert_eq!(pcm.len(), tokens.len() * SAMPLES_PER_FRAME);
        // Quantisation is the only change.
        for (&q, &x) in pcm.iter().zip(&samples) {
            assert!((f32::from(q) / 32767.0 - x).abs() <= 1.0 / 32767.0);
        }
    }

    #[test]
    fn wav_bytes_match_the_file() {
        let samples = render(&clip()).unwrap();
        let bytes = wav_bytes(&samples).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.wav");
        write_wav(&path, &samples).unwrap();
        assert_eq!(bytes, std::fs::read(&path).unwrap());
        let (spec, pcm) = read_back(hound::WavReader::new(Cursor::new(bytes)).unwrap());
        assert_eq!(spec.channels, 1);
        assert_eq!(pcm.len(), samples.len());
    }

    #[test]
    fn non_finite_samples_are_rejected_with_their_position() {
        let err = wav_bytes(&[0.0, 0.5, f32::NAN]).unwrap_err();
        assert!(matches!(err, CodecError::NonFiniteSample { index: 2, .. }));
    }

    #[test]
    fn unwritable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("clip.wav");
        let err = write_wav(&path, &[0.0]).unwrap_err();
        assert!(err.to_string().contains("missing"));
    }
}
