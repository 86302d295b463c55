"""Writing files safely: atomic writes (a reader sees the old file or the new one, never half of one), one
exclusive lock per output (a second writer fails at once), and the rule every command's ``--out`` follows:
never replace what the command did not write itself without ``--overwrite`` (:func:`check_output_dir`,
:func:`check_output_file`). The only place that knows how to write safely; prepare, train, checkpoints,
fine-tuning, prediction, features, export and the demo use it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pretrain import PretrainError


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask now (read at each call: a launcher or the user's code may set it after import).
    Linux reports it in /proc/self/status; elsewhere it is set and put back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str | Path) -> None:
    """Give a file the permissions a plain ``open()`` would (0666 less the process's umask), a folder's
    files included (a folder itself: 0777 less the umask). safetensors (and peft through it) creates its
    files 0600 whatever the umask, which hid a run's weights from the rest of a group sharing the machine;
    :func:`atomic_path` applies this to every file written through it, the exports and adapters to every
    file they write."""
    mask = current_umask()
    p = Path(path)
    if p.is_dir():
        os.chmod(p, 0o777 & ~mask)
        for f in p.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(p, 0o666 & ~mask)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write the whole file to; once the block ends it gets
    the umask's mode (:func:`default_mode`), is fsync'ed and renamed over ``path``, so readers see the old
    file or the new one, never half of one. If the block fails, the temporary file is removed and ``path``
    is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        default_mode(tmp)  # (whatever wrote it: the mode a plain open() gives under the umask)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def exclusive_lock(lock: Path, busy: str, error: type[Exception] = PretrainError) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created, and removed on exit) for the block; if another
    process holds it, raise ``error(busy)`` at once instead of waiting. Off POSIX there is no lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise error(busy) from None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the lock file was removed by a holder that just finished: take the new one
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        f.close()


# ------------------------------------------------------------------------------------------------ outputs
#
# Rule: no command replaces what it did not write without --overwrite. An output folder may be written when
# it does not exist, is empty (hidden entries aside: lock and temporary files, .git) or holds the same
# command's own earlier output, recognised by its defining files (a run: checkpoints/ or config.yaml +
# tokenizer.json; a fine-tune: finetune.json or finetune.yaml + metrics.jsonl; ...). A single output file
# (predict, embed) may be replaced when it does not exist or when the same command wrote it and it has not
# changed since: each command that writes a file records it (name, size, mtime) in the hidden OUTPUTS file of
# its folder. An export records its files (size, sha256) in the last line of its model card, an HTML comment,
# so that one whose card (or any other file) was edited afterwards is not exported over without --overwrite,
# and the folder holds nothing but what is meant to be shared. With --overwrite a command
# writes into the folder (its own files replace those of the same name, other files stay) or replaces the
# file. An output that is, or holds, one of the command's inputs is refused, --overwrite or not.

OUTPUTS = ".pretrain-outputs.json"
"""The record of the files that pretrain commands (predict, embed) wrote in a folder."""

KINDS = {  # kind → (what it is, its defining files)
    "run": ("a pre-training run", "checkpoints/, config.yaml"),
    "finetune": ("a fine-tuned model", "finetune.json, finetune.yaml"),
    "export": ("a Hugging Face export", "config.json, model.safetensors"),
    "hf-model": ("a Hugging Face model not exported by pretrain", "config.json, model.safetensors"),
    "data": ("prepared data", "meta.json, *.bin or *.u8"),
    "transfer": ("a transfer report", "report.json, runs/"),
    "demo": ("the output of `pretrain demo`", "data/, run/, task/, finetune_*/"),
}
OWN_KIND = {"train": "run", "finetune": "finetune", "export": "export", "prepare": "data",
            "transfer": "transfer", "demo": "demo"}
"""The kind of folder each command writes."""

RECORDED = {"export"}
"""Kinds whose folder records its files (at the end of its model card): replaced only while none changed."""
CARD = "README.md"
CARD_RECORD = "<!-- pretrain-record: "

DEMO_ENTRIES = {"data", "run", "task", "finetune_pretrained", "finetune_scratch", "data_images", "run_images",
                "finetune_images_pretrained", "finetune_images_scratch"}
EXPORT_CARD = "pre-trained with `pretrain`"  # in the model card (README.md) of every export
_TRANSFER_RUN = re.compile(r"[\w.-]+_n\d+_s\d+")


def visible_entries(path: Path) -> list[Path]:
    """The entries of folder ``path`` that count for emptiness: hidden ones (a stale lock, a temporary file,
    ``.git``, the OUTPUTS record) are never replaced by a command, so they do not."""
    return sorted(p for p in Path(path).iterdir() if not p.name.startswith("."))


def _has_weights(p: Path) -> bool:
    return (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file() or any(
        p.glob("model-*.safetensors"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_demo(p: Path) -> bool:
    entries = visible_entries(p)
    if not entries or any(e.name not in DEMO_ENTRIES or not e.is_dir() for e in entries):
        return False
    meta = _read_json(p / "data" / "meta.json")  # prepared from the Python standard library's modules
    sources = meta.get("sources") if isinstance(meta, dict) else None
    if not sources or not all(isinstance(s, dict) and str(s.get("path", "")).endswith(".py")
                              for s in sources):
        return False
    kinds = {"data": "data", "run": "run", "finetune_pretrained": "finetune", "finetune_scratch": "finetune",
             "data_images": "data", "run_images": "run", "finetune_images_pretrained": "finetune",
             "finetune_images_scratch": "finetune"}
    for e in entries:
        if e.name == "task":
            if any(f.name not in ("train.jsonl", "valid.jsonl") for f in visible_entries(e)):
                return False
        elif visible_entries(e) and kinds[e.name] not in output_kinds(e):
            return False
    return True


def output_kinds(path: str | Path) -> list[str]:
    """What the folder ``path`` holds, recognised by its defining files (see KINDS): usually one kind, several
    when one command was made to write into another's folder; none for an empty folder or other files."""
    p = Path(path)
    if not p.is_dir():
        return []
    found = []
    if (p / "checkpoints").is_dir() or ((p / "config.yaml").is_file() and (p / "tokenizer.json").is_file()):
        found.append("run")
    if (p / "finetune.json").is_file() or ((p / "finetune.yaml").is_file()
                                           and (p / "metrics.jsonl").is_file()):
        found.append("finetune")
    if (p / "config.json").is_file() and _has_weights(p):
        try:
            ours = EXPORT_CARD in (p / "README.md").read_text(encoding="utf-8", errors="replace")
        except OSError:
            ours = False
        found.append("export" if ours else "hf-model")
    if (p / "meta.json").is_file() and (any(p.glob("*.bin")) or any(p.glob("*.u8"))):  # token / image shards
        found.append("data")
    if (p / "report.json").is_file() or ((p / "runs").is_dir() and any(
            _TRANSFER_RUN.fullmatch(r.name) for r in (p / "runs").iterdir())):
        found.append("transfer")
    if _is_demo(p):
        found.append("demo")
    return found


def describe(path: str | Path) -> str:
    """What is at ``path``, for an error message: a kind of output with its defining files, or the first
    few names a folder holds."""
    p = Path(path)
    if not p.is_dir():
        return "a file" if p.exists() else "nothing"
    kinds = output_kinds(p)
    if kinds:
        return " and ".join(f"{KINDS[k][0]} ({KINDS[k][1]})" for k in kinds)
    names = [e.name + ("/" if e.is_dir() else "") for e in visible_entries(p)]
    return "other files (" + ", ".join(names[:3]) + (", …" if len(names) > 3 else "") + ")"


def _check_inputs(out: Path, inputs: Any, command: str) -> None:
    """An output that is one of the command's inputs, or a folder holding one, is refused: writing there would
    replace an input (or mix the output into it), whatever --overwrite says."""
    o = out.resolve()
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        i = Path(inp)
        if o == i.resolve() or (out.exists() and i.exists() and os.path.samefile(out, i)):
            raise PretrainError(f"{out} is {describe(i)}, an input of `pretrain {command}`: writing there "
                                "would replace it (--overwrite does not apply to inputs); "
                                "choose another --out")
        if o in i.resolve().parents:
            raise PretrainError(f"{out} holds {i}, an input of `pretrain {command}`: writing there would mix "
                                "the output into the input's folder (--overwrite does not apply to inputs); "
                                "choose another --out")


def _load_record(folder: Path) -> dict[str, Any]:
    rec = _read_json(folder / OUTPUTS)
    return rec if isinstance(rec, dict) and isinstance(rec.get("outputs"), dict) else {"outputs": {}}


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def record_output(path: str | Path, command: str) -> None:
    """Note in the OUTPUTS record of its folder that ``command`` wrote the file ``path``, as it is now (size,
    modification time): :func:`check_output_file` then lets the same command replace it while it stays
    unchanged. Best effort: a folder that cannot take the record (read-only) only means that the next run
    asks for --overwrite."""
    p = Path(path)
    try:
        rec = _load_record(p.parent)
        rec["outputs"][p.name] = {"command": command, "stat": _stat(p)}
        rec["note"] = "by pretrain: the files its commands wrote here, so that a rerun may replace them"
        write_json_atomic(p.parent / OUTPUTS, rec)
    except OSError:
        pass


def _file_changed(p: Path, command: str) -> bool | None:
    """Whether the file ``p`` changed since ``command`` recorded it, or None when ``command`` did not."""
    entry = _load_record(p.parent)["outputs"].get(p.name)
    if not isinstance(entry, dict) or entry.get("command") != command:
        return None
    return not p.is_file() or _stat(p) != entry.get("stat")


def _fingerprint(p: Path) -> list[Any]:
    """Size and sha256 (weights: size only, they are large and nobody edits them by hand)."""
    if p.suffix == ".safetensors":
        return [p.stat().st_size, None]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [p.stat().st_size, h.hexdigest()]


def card_record(folder: str | Path, command: str, files: list[str], card: str) -> str:
    """The last line of the model card ``card`` that ``command`` writes into ``folder`` beside ``files``: an
    HTML comment (invisible where the card is shown) with each file's size and sha256 and the card's own, so
    that a later run can tell whether any of them was edited (:func:`check_output_dir`) without a file of
    its own in a folder meant to be shared as it is."""
    folder = Path(folder)
    prints = {n: _fingerprint(folder / n) for n in sorted(files)}
    prints[CARD] = [None, hashlib.sha256(card.encode("utf-8")).hexdigest()]
    return f"{CARD_RECORD}{json.dumps({'command': command, 'files': prints})} -->\n"


def _card_changes(p: Path, command: str) -> list[str] | None:
    """The files of the folder ``p`` changed since ``command`` wrote them ([] when none), going by the record
    at the end of its model card; None when the card holds no record of ``command``."""
    try:
        text = (p / CARD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, _, last = text.rstrip("\n").rpartition("\n")
    if not last.startswith(CARD_RECORD) or not last.endswith(" -->"):
        return None
    try:
        rec = json.loads(last[len(CARD_RECORD):-len(" -->")])
        files = dict(rec["files"])
    except (ValueError, KeyError, TypeError):
        return None
    if rec.get("command") != command:
        return None
    changed = []
    for name, fp in files.items():
        f = p / name
        if name == CARD:
            if hashlib.sha256((body + "\n").encode("utf-8")).hexdigest() != fp[1]:
                changed.append(name)
        elif f.is_file() and _fingerprint(f) != fp:
            changed.append(name)
    return changed


def check_output_dir(out: str | Path, command: str, inputs: Any = (), overwrite: bool = False) -> None:
    """``pretrain COMMAND --out OUT`` (a folder) may go ahead: OUT is new, empty, or holds COMMAND's own
    earlier output (unchanged where COMMAND recorded its files), or ``overwrite`` is set; and it is not one
    of ``inputs`` nor a folder holding one. Otherwise one error naming what is there and how to proceed."""
    out = Path(out)
    _check_inputs(out, inputs, command)
    if out.exists() and not out.is_dir():
        raise PretrainError(f"{out} is a file; `pretrain {command}` writes a folder: choose another --out")
    if not out.exists() or not visible_entries(out) or overwrite:
        return
    own = OWN_KIND[command]
    kinds = output_kinds(out)
    if kinds == [own]:
        if own not in RECORDED:  # recognised by its files: replaced as the command replaces them
            return
        changed = _card_changes(out, command)
        if changed == []:
            return
        if changed is None:
            raise PretrainError(f"{out} holds {KINDS[own][0]} whose {CARD} does not end with pretrain's "
                                "record of its files (an export older than this record, or a card edited), "
                                "so edits to it cannot be told: pass --overwrite to replace its files, or "
                                "choose another --out")
        raise PretrainError(f"{out} holds an earlier `pretrain {command}` whose {', '.join(changed)} changed "
                            "after it was written: pass --overwrite to replace "
                            f"{'them' if len(changed) > 1 else 'it'}, or choose another --out")
    raise PretrainError(f"{out} is not empty and not an earlier `pretrain {command}`'s output: it holds "
                        f"{describe(out)}; pass --overwrite to write into it anyway (files of the same name "
                        "are replaced, others stay), or choose another --out")


def check_output_file(out: str | Path, command: str, inputs: Any = (), overwrite: bool = False) -> None:
    """``pretrain COMMAND --out FILE`` may go ahead: FILE does not exist, or COMMAND wrote it (recorded by
    :func:`record_output`) and it has not changed since, or ``overwrite`` is set; and it is none of
    ``inputs``. Otherwise one error naming what is there and how to proceed."""
    out = Path(out)
    _check_inputs(out, inputs, command)
    if out.is_dir():
        raise PretrainError(f"{out} is a folder; `pretrain {command}` writes a file: "
                            "give a file name as --out")
    if not out.exists() or overwrite:
        return
    changed = _file_changed(out, command)
    if changed is False:
        return
    why = ("was changed after `pretrain " + command + "` wrote it" if changed
           else "already exists and was not written by `pretrain " + command + "`")
    raise PretrainError(f"{out} {why}: pass --overwrite to replace it, or choose another --out")


def write_failed(e: OSError, what: str, where: Path, need_bytes: int | None = None,
                 kept: str = "") -> PretrainError:
    """One clear error for an OS failure while writing (a full disk above all): what could not be written,
    where, how much space it needed and how much is free, and what on disk is still good."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_size(shutil.disk_usage(probe).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"; it needs about {_size(need_bytes)}" if need_bytes else ""
    return PretrainError(f"could not write {what} to {where}: {e.strerror or e}{need}, {free}"
                         + (f"; {kept}" if kept else ""))


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def nbytes(obj: Any) -> int:
    """The bytes of every tensor (or array) in a nest of dicts, lists and tuples: what saving it takes."""
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    n = getattr(obj, "nbytes", None)
    return int(n) if isinstance(n, int) else 0
