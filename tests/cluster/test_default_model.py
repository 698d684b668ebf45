"""The default model served the way a user runs it: `kvfleet serve` (a real process, its own local
Ray, Redis and gRPC on loopback) with SmolLM2-135M-Instruct from its GGUF file, and the gRPC API's
chat path: the server renders the model's own chat template (Tokenize and Generate), as
`kvfleet generate --chat` sends it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cluster.client import KvfleetClient
from kvstore.redis_server import free_port
from workers.models.tokenizer import load_tokenizer

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory):
    """`kvfleet serve config.yaml` in its own process; yields its gRPC target; SIGTERM at the end."""
    port = free_port()
    config = {
        "engine": {
            "model": str(smollm2_gguf),
            "model_id": "SmolLM2-135M-Instruct",
            "device": "cpu",
            "num_pages": 256,
            "max_model_len": 1024,
        },
        "target": {"replicas": 1, "num_cpus": 1},
        "ingress": {"replicas": 1, "num_cpus": 0.25},
        "grpc": {"host": "127.0.0.1", "port": port, "http_port": 0},
        "ray": {"num_cpus": 2, "dashboard_port": free_port()},
    }
    path = tmp_path_factory.mktemp("serve") / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = path.parent / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while "Ctrl-C stops everything" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kvfleet serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(900)
def test_tokenize_renders_the_models_chat_template_on_the_server(served, smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    messages = [{"role": "user", "content": QUESTION}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with KvfleetClient(served) as client:
        (model,) = client.list_models()
        assert model.id == "SmolLM2-135M-Instruct" and model.has_chat_template
        got = client.tokenize(messages)
    assert list(got.token_ids) == tok.encode(text, add_special_tokens=False)
    assert got.token_ids[-4:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


@pytest.mark.timeout(900)
def test_generate_chat_answers_through_grpc(served, capsys):
    with KvfleetClient(served) as client:
        chunks = list(client.generate([{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0.0))
    answer = "".join(c.text for c in chunks)
    assert "Paris" in answer, answer
    # the same through the command line a user types
    from cluster.cli import main

    main(["generate", "--chat", "--target", served, "--max-tokens", "24", QUESTION])
    assert "Paris" in capsys.readouterr().out
