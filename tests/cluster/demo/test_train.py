"""The demo-model training pipeline, end to end at toy scale on CPU (the real run needs a GPU)."""

import copy
import json

import numpy as np
import torch
import transformers

from cluster.demo import train as train_demo


def test_held_out_files_alternate_between_dev_and_test():
    eos = train_demo.EOS_ID
    tokens = np.array([5, 6, eos, 7, eos, 8, 9, eos, 10, eos], dtype=np.uint16)
    dev, test = train_demo.split_held_out(tokens)
    assert dev.tolist() == [5, 6, eos, 8, 9, eos] and test.tolist() == [7, eos, 10, eos]


def test_tokenizer_marks_each_text_as_a_file_start(tokenizer):
    marked = train_demo.mark_file_start(copy.deepcopy(tokenizer))
    plain = tokenizer.encode("x = 1", add_special_tokens=False)
    assert marked.encode("x = 1") == [train_demo.EOS_ID, *plain]
    assert marked.encode("x = 1", add_special_tokens=False) == plain


def test_residual_dropout_acts_only_while_training():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        clean = model(x).logits
        train_demo.add_residual_dropout(model, 0.5)
        assert torch.equal(model.eval()(x).logits, clean)
        assert not torch.allclose(model.train()(x).logits, clean)
    assert set(model.state_dict()) == set(transformers.LlamaForCausalLM(config).state_dict())


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
        seq_len=32,
        batch_size=2,
        target_steps=2,
        draft_steps=2,
        warmup=1,
        eval_every=1,
        dev_tokens=256,
        eval_tokens=256,
        sample_tokens=4,
    )
    record = train_demo.train(data, tmp_path / "out", cfg, log=lambda m: None)
    assert record["target_run"]["steps_run"] == 2 and record["draft_run"]["best_step"] in (1, 2)
    for name in ("kvfleet-pycoder", "kvfleet-pycoder-draft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / name)
        assert model.config.vocab_size == train_demo.VOCAB_SIZE
        card = (tmp_path / "out" / name / "README.md").read_text()
        assert f"{record['results']['target_val_loss']:.3f}" in card and "Greedy agreement" in card
        assert model.config.bos_token_id == train_demo.EOS_ID
    assert record["sample"]["prompt"] == train_demo.SAMPLE_PROMPT
