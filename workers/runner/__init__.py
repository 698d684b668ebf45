"""The model runner, by job: `config` (RunnerConfig and what it is resolved from), `memory` (KV
page sizing and the cache tensors), `buffers` (persistent step inputs), `graphs` (CUDA-graph
capture and replay), `model_runner` (step preparation and execution), `draft_decode` (the draft's
device-fed k-step decode) and `tp` (the tensor-parallel step protocol)."""
