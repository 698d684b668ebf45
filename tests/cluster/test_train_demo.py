"""The demo-model training pipeline, end to end at toy scale on CPU (the real run needs a GPU)."""

import json

import numpy as np
import transformers

from cluster import train_demo


def test_held_out_files_alternate_between_dev_and_test():
    eos = train_demo.EOS_ID
    tokens = np.array([5, 6, eos, 7, eos, 8, 9, eos, 10, eos], dtype=np.uint16)
    dev, test = train_demo.split_held_out(tokens)
    assert dev.tolist() == [5, 6, eos, 8, 9, eos] and test.tolist() == [7, eos, 10, eos]


def test_pipeline_writes_models_transformers_loads_with_cards(tmp_path, tokenizer):
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    tokenizer.save_pretrained(data / "tokenizer")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, len(tokenizer), 20_000).astype(np.uint16)
    tokens[::500] = train_demo.EOS_ID
    np.save(data / "train.npy", tokens[:16_000])
    np.save(data / "val.npy", tokens[16_000:])
    (data / "meta.json").write_text(
        json.dumps(
            dict(
                source="test",
                files=2,
                val_rule="test",
                bytes=1,
                train_tokens=16_000,
                val_tokens=4_000,
                sha256="0" * 64,
                vocab_size=len(tokenizer),
            )
        )
    )
    cfg = train_demo.TrainConfig(
        seq_len=32, batch_size=2, target_steps=2, draft_steps=2, warmup=1, eval_every=1, dev_tokens=256, eval_tokens=256
    )
    record = train_demo.train(data, tmp_path / "out", cfg, log=lambda m: None)
    assert record["target_run"]["steps_run"] == 2 and record["draft_run"]["best_step"] in (1, 2)
    for name in ("kvfleet-pycoder", "kvfleet-pycoder-draft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name)
        assert model.config.vocab_size == train_demo.VOCAB_SIZE
        card = (tmp_path / "out" / name / "README.md").read_text()
        assert f"{record['results']['target_val_loss']:.3f}" in card and "Greedy agreement" in card
