"""KV pages as tensors: a model's cache is one tensor [layers, 2, pages, ...] whose per-layer views
the attention layers write, and pages of every layer move in one op; the per-layer path (caches
that are not views of one tensor) moves the same bytes."""

import torch

from workers.runner.kv_pages import KVPages, copy_pages
from workers.runner.memory import allocate_kv_cache

LAYERS, PAGES, SHAPE = 3, 8, (2, 1, 4)


def per_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(PAGES, *SHAPE, generator=g) for _ in range(LAYERS)]
    v = [torch.randn(PAGES, *SHAPE, generator=g) for _ in range(LAYERS)]
    return KVPages(k, v)


def stacked_copy(pages: KVPages) -> KVPages:
    return KVPages.of(torch.stack([torch.stack([k, v]) for k, v in zip(pages.k, pages.v, strict=True)]).clone())


def test_the_model_cache_is_one_tensor_whose_layer_views_the_layers_hold():
    class Attn:
        k_cache = v_cache = None

    class Model:
        def __init__(self):
            self.layers = [Attn() for _ in range(LAYERS)]

        def attention_layers(self):
            return self.layers

    model = Model()
    allocate_kv_cache(model, (PAGES, *SHAPE), torch.float32, torch.device("cpu"))
    pages = KVPages.of_model(model)
    assert pages.stacked is model.kv_cache and pages.stacked.shape == (LAYERS, 2, PAGES, *SHAPE)
    model.layers[1].v_cache[5].fill_(7.0)  # a layer's write is the stacked tensor's
    assert (pages.gather([5])[1, 1] == 7.0).all()


def test_stacked_and_per_layer_pages_gather_scatter_and_copy_the_same_bytes():
    a = per_layer()
    b = stacked_copy(a)
    assert a.stacked is None and b.stacked is not None
    pick = [6, 1, 3]
    assert torch.equal(a.gather(pick), b.gather(pick))
    out = torch.zeros(LAYERS, 2, 5, *SHAPE)
    b.gather(pick, out=out[:, :, 1:4])  # into a slice: not contiguous
    assert torch.equal(out[:, :, 1:4], a.gather(pick)) and not out[:, :, 0].any()
    data = torch.randn(LAYERS, 2, 2, *SHAPE)
    a.scatter([0, 7], data)
    b.scatter([0, 7], data)
    assert torch.equal(a.gather(range(PAGES)), b.gather(range(PAGES)))
    host_a, host_b = KVPages.host(a, 4), KVPages.host(b, 4)
    assert host_b.stacked is not None
    copy_pages(a, [2, 7], host_a, [3, 0])
    copy_pages(b, [2, 7], host_b, [3, 0])
    assert torch.equal(host_a.gather([3, 0]), host_b.gather([3, 0]))
    assert torch.equal(host_b.gather([3, 0]), b.gather([2, 7]))


def test_views_that_are_not_the_stacked_layout_fall_back_to_per_layer_copies():
    base = torch.zeros(LAYERS, 2, PAGES, *SHAPE)
    pages = KVPages([t[1] for t in base], [t[0] for t in base], base)  # k and v swapped: not its views
    assert pages.stacked is None


def test_a_copy_of_runs_of_pages_reads_them_in_place_and_moves_the_same_bytes():
    src = stacked_copy(per_layer(seed=3))
    for pick, slots in (
        ([1, 2, 3, 6, 7], [4, 0, 2, 3, 1]),
        ([5, 0, 3], [0, 2, 1]),
        (list(range(PAGES)), list(range(PAGES))[::-1]),
    ):
        dst = KVPages.host(src, PAGES)
        dst.stacked.zero_()
        copy_pages(src, pick, dst, slots)  # few runs (read in place), or scattered (gather, then scatter)
        assert torch.equal(dst.gather(slots), src.gather(pick))
        others = [s for s in range(PAGES) if s not in slots]
        assert not dst.gather(others).any() if others else True


def test_a_scattered_cpu_copy_in_parts_moves_the_same_bytes(monkeypatch):
    from workers.runner import kv_pages

    src = stacked_copy(per_layer(seed=5))
    page = 2 * src.stacked[0, 0, 0].numel() * src.stacked.element_size()
    pick, slots = [7, 0, 5, 2, 4, 1, 6], [3, 6, 0, 5, 1, 7, 2]  # 7 runs: gathered and scattered
    for part_pages in (1, 3, 100):  # parts of a page, of 3 (the last one short), or one part
        monkeypatch.setattr(kv_pages, "_CPU_COPY_PART_BYTES", part_pages * page)
        dst = KVPages.host(src, PAGES)
        dst.stacked.zero_()
        copy_pages(src, pick, dst, slots)
        assert torch.equal(dst.gather(slots), src.gather(pick))
        assert not dst.gather([4]).any()  # the one slot not written
