"""Text-conditioned latent folders (shd_diffusion.latents.write_text_latents, data.TextLatentDataset),
conditioning stacking and CFG dropout, and the class-label format they must leave unchanged."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shd_diffusion.data import (
    DatasetError,
    LatentDataset,
    TextLatentDataset,
    collate_text_items,
    drop_conditioning,
    make_loader,
    stack_conditioning,
)
from shd_diffusion.latents import write_synthetic_text_latents, write_text_latents

N, L, D, P = 10, 5, 8, 3


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
    """Latents, flipped latents, per-sample conditioning in three dtypes, and the empty prompt."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(N, 4, 2, 2, generator=g)  # (N, C, h, w)
    flips = torch.randn(N, 4, 2, 2, generator=g)
    samples = [
        {
            "prompt_embeds": torch.randn(L, D, generator=g).to(torch.bfloat16),
            "pooled_prompt_embeds": torch.randn(P, generator=g).half(),
            "prompt_mask": torch.arange(L) <= i % L,
        }
        for i in range(N)
    ]
    empty = {"prompt_embeds": torch.zeros(L, D, dtype=torch.bfloat16), "pooled_prompt_embeds": torch.ones(P).half(),
             "prompt_mask": torch.arange(L) < 1}
    return latents, flips, samples, empty


def write(out: Path, seed: int = 0, **kw):
    latents, flips, samples, empty = make_data(seed)
    return write_text_latents(out, latents, samples, empty, source="test", image_size=16, shard_size=4,
                              latents_flip=flips, **kw)


def test_round_trip_is_bitwise_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "t2i"
    report = write(out, max_shards=1)
    assert (report.num_shards, report.written, report.pending, report.index) == (3, [0], [1, 2], None)
    with pytest.raises(DatasetError, match="index.json not found"):
        TextLatentDataset(out)
    (out / ".shard_00001.safetensors.k1ll3d.tmp.safetensors").write_bytes(b"half a shard")  # a killed write
    mtime = (out / "shard_00000.safetensors").stat().st_mtime_ns
    report = write(out)
    assert (report.written, report.skipped) == ([1, 2], [0])
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.iterdir()) == [
        "empty_prompt.safetensors", "index.json", "shard_00000.safetensors", "shard_00001.safetensors",
        "shard_00002.safetensors"]
    assert write(out).written == []  # idempotent

    latents, flips, samples, empty = make_data()
    ds = TextLatentDataset(out)
    assert (len(ds), ds.in_channels, ds.input_size, [s["count"] for s in ds.index["shards"]]) == (N, 4, 2, [4, 4, 2])
    for i in range(N):
        x, cond = ds[(i, 2)]  # even seed: the stored latent
        assert torch.equal(x, latents[i]) and torch.equal(ds[(i, 3)][0], flips[i])  # odd seed: mirrored
        assert cond.keys() == samples[i].keys()
        for k, v in samples[i].items():
            assert cond[k].dtype == v.dtype and torch.equal(cond[k], v), (i, k)
    assert torch.equal(TextLatentDataset(out, hflip=False)[(1, 3)][0], latents[1])
    for k, v in empty.items():
        assert ds.empty_conditioning[k].dtype == v.dtype and torch.equal(ds.empty_conditioning[k], v)

    x, cond = next(make_loader(ds, batch_size=4, shuffle=False))  # the default collate takes dict items
    assert torch.equal(x, latents[:4]) and cond["prompt_embeds"].shape == (4, L, D)
    for k in empty:
        assert torch.equal(cond[k], torch.stack([s[k] for s in samples[:4]]))
    x2, cond2 = collate_text_items([ds[i] for i in range(4)])
    assert torch.equal(x2, x) and all(torch.equal(cond2[k], cond[k]) for k in cond)
    copy = pickle.loads(pickle.dumps(ds))  # spawned DataLoader workers: open handles are not pickled
    assert torch.equal(copy[7][0], latents[7]) and torch.equal(copy[7][1]["prompt_embeds"], samples[7]["prompt_embeds"])


def test_fingerprint_and_refusals_of_other_data(tmp_path: Path) -> None:
    write(tmp_path / "a")
    write(tmp_path / "b")
    fp = TextLatentDataset(tmp_path / "a").fingerprint()
    assert TextLatentDataset(tmp_path / "b").fingerprint() == fp  # same data, other folder
    write(tmp_path / "c", seed=1)
    assert TextLatentDataset(tmp_path / "c").fingerprint() != fp
    with pytest.raises(DatasetError, match=r"shard_00000.safetensors belongs to a different extraction \(data_sha256"):
        write(tmp_path / "a", seed=1)


def test_synthetic_writer_is_deterministic(tmp_path: Path) -> None:
    r = write_synthetic_text_latents(tmp_path / "s1", num_images=6, seed=3, cond_dtype=torch.bfloat16)
    write_synthetic_text_latents(tmp_path / "s2", num_images=6, seed=3, cond_dtype=torch.bfloat16)
    a, b = TextLatentDataset(tmp_path / "s1"), TextLatentDataset(tmp_path / "s2")
    assert r.index["num_images"] == 6 and a.fingerprint() == b.fingerprint()
    x, cond = a[4]
    assert torch.equal(x, b[4][0]) and cond["prompt_mask"].tolist() == [True] * 5 + [False]  # 1 + 4 % 6 tokens
    assert cond["prompt_embeds"].dtype == torch.bfloat16 and not cond["prompt_embeds"][5].any()  # padding zeroed
    assert a.empty_conditioning["prompt_mask"].sum() == 1


def old_folder(root: Path) -> None:
    """A class-label latent folder as extract_latents wrote it before text shards existed."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    counts = [3, 2]
    for s, n in enumerate(counts):
        save_file({"latents": torch.randn(n, 4, 2, 2, generator=g), "labels": torch.tensor([s, 1 - s, s][:n])},
                  str(root / f"shard_{s:05d}.safetensors"))
    index = {"format": "shd_latents/1", "image_size": 16, "scale_factor": 0.18215, "both_flips": False,
             "latent_shape": [4, 2, 2], "classes": ["a", "b"], "num_images": 5,
             "shards": [{"name": f"shard_{s:05d}.safetensors", "count": n} for s, n in enumerate(counts)]}
    (root / "index.json").write_text(json.dumps(index))


def test_class_label_folders_load_and_fingerprint_as_before(tmp_path: Path) -> None:
    old_folder(tmp_path / "old")
    ds = LatentDataset(tmp_path / "old")
    # Golden value from the reader before text folders existed (commit ce0b7da) on this folder.
    assert ds.fingerprint() == "5a6a7b2907913cbc210b6f1a37c90b48fbcfbdf7d90ddab5395cba7e38d03c57"
    assert ds.labels.tolist() == [0, 1, 0, 1, 0] and ds[3][1].item() == 1
    assert torch.equal(pickle.loads(pickle.dumps(ds))[4][0], ds[4][0])  # after a handle was opened
    x, y = next(make_loader(ds, batch_size=5, shuffle=False))
    assert x.shape == (5, 4, 2, 2) and y.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(DatasetError, match=r"format 'shd_latents/1', expected 'shd_latents_text/1'"):
        TextLatentDataset(tmp_path / "old")
    write_synthetic_text_latents(tmp_path / "new")
    with pytest.raises(DatasetError, match=r"format 'shd_latents_text/1', expected 'shd_latents/1'"):
        LatentDataset(tmp_path / "new")


def test_drop_conditioning_is_exact() -> None:
    _, _, samples, empty = make_data()
    cond = stack_conditioning(samples[:3])
    before = {k: v.clone() for k, v in cond.items()}
    dropped = drop_conditioning(cond, empty, torch.tensor([True, False, True]))
    for k in cond:
        assert dropped[k].dtype == cond[k].dtype
        assert torch.equal(dropped[k][0], empty[k]) and torch.equal(dropped[k][2], empty[k])
        assert torch.equal(dropped[k][1], cond[k][1]) and torch.equal(cond[k], before[k])  # input untouched
    kept = drop_conditioning(cond, empty, torch.zeros(3, dtype=torch.bool))
    assert all(torch.equal(kept[k], cond[k]) for k in cond)
    with pytest.raises(ValueError, match=r"drop must be \(3,\) bool"):
        drop_conditioning(cond, empty, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"empty-prompt keys"):
        drop_conditioning(cond, {"prompt_embeds": empty["prompt_embeds"]}, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"empty-prompt prompt_embeds is \(4, 8\)"):
        short = {**empty, "prompt_embeds": empty["prompt_embeds"][:4]}
        drop_conditioning(cond, short, torch.zeros(3, dtype=torch.bool))


def test_writer_refuses_bad_conditioning(tmp_path: Path) -> None:
    latents, _, samples, empty = make_data()

    def attempt(samples=samples, empty=empty):
        write_text_latents(tmp_path / "bad", latents, samples, empty, source="t", image_size=16)

    with pytest.raises(DatasetError, match=r"unknown conditioning key\(s\) \['foo'\]; use only prompt_embeds"):
        attempt([{**s, "foo": torch.zeros(2)} for s in samples], {**empty, "foo": torch.zeros(2)})
    short = [dict(s) for s in samples]
    short[1]["prompt_embeds"] = short[1]["prompt_embeds"][:4]
    with pytest.raises(DatasetError, match=r"sample 1 prompt_embeds is \(4, 8\).*pad every prompt to the same length"):
        attempt(short)
    with pytest.raises(DatasetError, match=r"empty-prompt conditioning for .*bad is .*pass empty= the empty prompt"):
        attempt(empty={k: v for k, v in empty.items() if k != "pooled_prompt_embeds"})
    with pytest.raises(DatasetError, match=r"prompt_mask is \(5,\) torch.int64; it must be bool"):
        attempt([{**s, "prompt_mask": s["prompt_mask"].long()} for s in samples],
                {**empty, "prompt_mask": empty["prompt_mask"].long()})
    with pytest.raises(DatasetError, match=r"lacks 'prompt_embeds'"):
        attempt([{"prompt_mask": s["prompt_mask"]} for s in samples], {"prompt_mask": empty["prompt_mask"]})
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_reader_refuses_broken_folders(tmp_path: Path) -> None:
    out = tmp_path / "t2i"
    write(out)
    (out / "empty_prompt.safetensors").rename(tmp_path / "empty.bak")
    with pytest.raises(DatasetError, match=r"empty_prompt.safetensors not found: .*rerun the writer with empty="):
        TextLatentDataset(out)
    (tmp_path / "empty.bak").rename(out / "empty_prompt.safetensors")

    from safetensors import safe_open

    with safe_open(str(out / "shard_00001.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "cond.foo": torch.zeros(4)}, str(out / "shard_00001.safetensors"))
    unknown = r"shard_00001.safetensors: tensors .*unknown \['cond.foo'\]\); delete the file"
    with pytest.raises(DatasetError, match=unknown):
        TextLatentDataset(out)
    shorter = tensors["cond.prompt_embeds"][:, :3].contiguous()  # (4, 3, 8): prompts padded to 3 tokens, not 5
    save_file({**tensors, "cond.prompt_embeds": shorter}, str(out / "shard_00001.safetensors"))
    with pytest.raises(DatasetError, match=r"shard_00001.safetensors: cond.prompt_embeds is \[4, 3, 8\] bfloat16, "
                                           r"expected \[4, 5, 8\] bfloat16"):
        TextLatentDataset(out)
