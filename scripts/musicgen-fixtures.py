"""Writes the MusicGen parity fixtures that `cargo test -p encore-musicgen --test parity` checks.

A tiny random MusicGen (T5 text encoder, decoder with 4 codebooks, EnCodec) is
built with Hugging Face transformers from a fixed seed and saved as a
checkpoint directory exactly as `save_pretrained` writes it, next to a small
trained T5-style Unigram tokenizer. The expected outputs (T5 encoder states,
decoder logits, delay pattern, EnCodec audio, guided greedy generation and its
per-step guided logits) go into `expected.safetensors` beside it.

Usage: scripts/musicgen-fixtures.sh [OUT_DIR]   (default musicgen/tests/fixtures/tiny)
       python scripts/musicgen-fixtures.py --checkpoint-only --size small OUT_DIR
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)

SIZES = {
    # Small enough for a few-MB fixture; every structural feature of the real
    # model (relative attention buckets, several T5 and decoder layers, a
    # projection between text and decoder widths, reflect padding, dilated
    # residual blocks, a 2-layer LSTM) is present.
    "tiny": dict(
        t5=dict(vocab_size=96, d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                relative_attention_num_buckets=8, relative_attention_max_distance=16),
        dec=dict(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=256),
        codec=dict(sampling_rate=8000, hidden_size=16, num_filters=4, upsampling_ratios=[4, 2],
                   codebook_size=64, target_bandwidths=[24.0]),
    ),
    # facebook/musicgen-small's shapes: T5-base text encoder, a 24-layer
    # 1024-wide decoder (419.6 M parameters with its heads), 32 kHz EnCodec.
    "small": dict(
        t5=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                relative_attention_num_buckets=32, relative_attention_max_distance=128),
        dec=dict(vocab_size=2048, hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                 max_position_embeddings=2048),
        codec=dict(sampling_rate=32000, hidden_size=128, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                   codebook_size=2048, target_bandwidths=[2.2]),
    ),
}

PROMPTS = ["calm piano in a minor key", "fast drums", "a bright violin melody over soft strings"]


def build(size: str) -> MusicgenForConditionalGeneration:
    s = SIZES[size]
    t5 = T5Config(feed_forward_proj="relu", dropout_rate=0.0, **s["t5"])
    codec = EncodecConfig(
        audio_channels=1, normalize=False, norm_type="weight_norm", pad_mode="reflect", use_causal_conv=False,
        kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
        num_residual_layers=1, num_lstm_layers=2, compress=2, trim_right_ratio=1.0, use_conv_shortcut=False,
        **s["codec"],
    )
    k = codec.num_quantizers
    assert k == 4, k
    dec = MusicgenDecoderConfig(
        num_codebooks=k, dropout=0.0, activation_function="gelu", pad_token_id=s["dec"]["vocab_size"],
        bos_token_id=s["dec"]["vocab_size"], **s["dec"],
    )
    cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    cfg.decoder_start_token_id = dec.bos_token_id
    cfg.pad_token_id = dec.pad_token_id
    model = MusicgenForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random init leaves the codebooks at zero, which would make every
        # decoded clip the same; real checkpoints have distinct codewords.
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
        # Larger logits than the default init, so that greedy choices are not
        # near-ties that rounding could flip.
        for head in model.decoder.lm_heads:
            head.weight.mul_(8.0)
    model.generation_config.decoder_start_token_id = dec.bos_token_id
    model.generation_config.pad_token_id = dec.pad_token_id
    model.generation_config.bos_token_id = dec.bos_token_id
    return model


def tokenizer(vocab_size: int) -> Tokenizer:
    """A T5-style Unigram tokenizer (Metaspace, </s> appended) trained on a few captions."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = PROMPTS + [
        "slow ambient pads", "happy ukulele strumming", "dark cinematic brass", "lofi hip hop beat",
        "a jazz trio with upright bass", "electronic dance track with heavy bass", "solo acoustic guitar",
    ] * 4
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="musicgen/tests/fixtures/tiny")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--checkpoint-only", action="store_true", help="write only config and weights")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.size)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    if args.checkpoint_only:
        return
    tok = tokenizer(SIZES[args.size]["t5"]["vocab_size"])
    tok.save(os.path.join(args.out, "tokenizer.json"))

    enc = [tok.encode(p).ids for p in PROMPTS]
    width = max(len(e) for e in enc)
    text_ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    text_mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    b, k = len(PROMPTS), model.decoder.num_codebooks
    vocab = model.decoder.config.vocab_size
    pad = model.decoder.config.pad_token_id

    out = {"text_ids": text_ids.to(torch.int64), "text_mask": text_mask.to(torch.int64)}
    with torch.no_grad():
        t5_states = model.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state
        out["t5_states"] = t5_states.contiguous()

        # Teacher-forced logits for a delayed audio sequence of 12 steps.
        steps = 12
        g = torch.Generator().manual_seed(1)
        raw = torch.randint(0, vocab, (b * k, steps), generator=g)
        start = torch.full((b * k, 1), pad)
        _, pattern = model.decoder.build_delay_pattern_mask(start, pad, max_length=steps + 1)
        dec_ids = torch.cat([start, raw], dim=-1)
        dec_ids = model.decoder.apply_delay_pattern_mask(dec_ids, pattern)
        out["delay_pattern"] = pattern.contiguous()
        out["decoder_ids"] = dec_ids.contiguous()
        logits = model(input_ids=text_ids, attention_mask=text_mask, decoder_input_ids=dec_ids).logits
        out["logits"] = logits.reshape(b, k, steps + 1, vocab).contiguous()

        # EnCodec decode of random codes: (batch, codebooks, frames).
        codes = torch.randint(0, model.audio_encoder.config.codebook_size, (b, k, 10), generator=g)
        audio = model.audio_encoder.decode(codes[None], [None] * b).audio_values
        out["codec_codes"] = codes.contiguous()
        out["codec_audio"] = audio.contiguous()

        # Greedy generation with classifier-free guidance. transformers 5
        # returns audio from MusicGen's generate; the codes are the argmax of
        # each step's guided scores, masked by the delay pattern and reverted,
        # exactly as generate does internally.
        max_len = 16
        gen = model.generate(
            input_ids=text_ids, attention_mask=text_mask, do_sample=False, guidance_scale=3.0,
            max_length=max_len, return_dict_in_generate=True, output_scores=True,
        )
        scores = torch.stack(gen.scores, dim=1).reshape(b, k, max_len - 1, vocab)
        out["greedy_scores"] = scores.contiguous()
        _, gen_pattern = model.decoder.build_delay_pattern_mask(start, pad, max_length=max_len)
        seq = torch.cat([start, scores.argmax(-1).reshape(b * k, -1)], dim=-1)
        seq = model.decoder.apply_delay_pattern_mask(seq, gen_pattern)
        out["greedy_codes"] = seq[seq != pad].reshape(b, k, -1).contiguous()
        out["greedy_audio"] = gen.sequences.contiguous()
    save_file({n: t.contiguous() for n, t in out.items()}, os.path.join(args.out, "expected.safetensors"))
    with open(os.path.join(args.out, "prompts.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "guidance_scale": 3.0, "max_length": max_len}, f, indent=1)


if __name__ == "__main__":
    main()
