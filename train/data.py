"""Training data: healthy slices from a folder, split by subject, and the samples the loop trains on.

1. ``load_slices``: every scan (or photo) of a folder, minus masks and label maps, through the model's
   preprocessing contract (``condiff.preprocess``) into one array ``(N, C, H, W)`` float32 in [0, 1]
   (uncentred: the synthetic tasks run on [0, 1], reference-method §1), cached per input file as ``.npy``
   under a key of the file's identity and the contract, so a second run or another fold reads arrays.
2. ``SliceSet.split_holdout``: the last ``n`` subjects (in the order of the sorted case names) are held
   out for validation and the healing metric; no subject contributes slices to both sides. A case's
   subject (``subject_of``) is the BIDS ``sub-<label>`` of its path (a ``sub-*`` folder, else the
   file name's ``sub-`` entity), so every session and run of a BIDS subject falls on one side; a file
   outside any BIDS layout is its own subject.
3. ``TaskSamples``: a map-style Dataset whose key is ``(epoch, index)``. Each key owns its random
   streams, seeded by ``SeedSequence([seed, stream, epoch, index])`` (§10 D4): one stream for the
   ``RestorationTask`` (corruption), one for the diffusion draw (t, eps). A sample is therefore a pure
   function of its key: the same in every worker, after a resume, and whether a batch is drawn by one
   process or sharded over several (the key already separates workers, so the worker id is not part of
   it, and the number of workers never changes a result).
4. ``StepBatchSampler``: an endless sample order, epoch ``e`` being a permutation seeded by
   ``(seed, e)``; step ``s`` of rank ``r`` takes positions ``p0 + s·G + r·B … + B`` of that stream
   (G = global batch, B = per-rank batch). The data-order state is the single integer ``p0 + s·G``.

RGB images are centred to [-1, 1] after the task, for both the clean and the corrupted image (§1).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from condiff.artifacts import file_sha256
from condiff.errors import InputImageError, TrainingDataError
from condiff.io.cases import DEFAULT_EXCLUDE, IMAGE_SUFFIXES, VOLUME_SUFFIXES, Case, discover, find_mask
from condiff.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

CACHE_VERSION = "condiff.slices/1"
N_TRAIN_TIMESTEPS = 1000
NOISE_OFFSET = 0.1  # reference-method §3: offset noise per (sample, channel)
TRAIN_STREAM, VAL_STREAM = 0, 1


# ------------------------------------------------------------------------------------------- slices


@dataclass
class SliceSet:
    """Healthy training images. ``images`` (N, C, H, W) float32 in [0, 1]; ``case`` (N,) int64 index into
    ``cases`` (case names, one per input file, sorted); ``case_subjects`` the subject of each case
    (``subject_of``); ``modality`` "mri" | "rgb"; ``source`` the folder they came from."""

    images: np.ndarray
    case: np.ndarray
    cases: list[str]
    modality: str
    source: str
    files: list[str] = field(default_factory=list)
    case_subjects: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.case_subjects:
            self.case_subjects = [subject_of(c) for c in self.cases]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def subjects(self) -> list[str]:
        """The subjects, in the order of their first case."""
        return list(dict.fromkeys(self.case_subjects))

    def select(self, subjects: Sequence[str]) -> "SliceSet":
        """The slices of every case of the named subjects (case order kept)."""
        wanted = set(subjects)
        ids = [i for i, s in enumerate(self.case_subjects) if s in wanted]
        keep = np.isin(self.case, ids)
        remap = {old: new for new, old in enumerate(ids)}
        return SliceSet(images=self.images[keep], case=np.array([remap[c] for c in self.case[keep]], dtype=np.int64),
                        cases=[self.cases[i] for i in ids], modality=self.modality, source=self.source,
                        files=[self.files[i] for i in ids] if self.files else [],
                        case_subjects=[self.case_subjects[i] for i in ids])

    def split_holdout(self, n_holdout: int) -> tuple["SliceSet", "SliceSet | None"]:
        """(training subjects, the last ``n_holdout`` subjects or None when 0); whole subjects, all their cases."""
        subjects = self.subjects
        n = len(subjects)
        if n_holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {n_holdout}")
        if n_holdout >= n:
            raise TrainingDataError(self.source, f"holding out {n_holdout} of {n} subjects leaves none to train on",
                                    "lower --holdout or add subjects")
        if n_holdout == 0:
            return self, None
        return self.select(subjects[:n - n_holdout]), self.select(subjects[n - n_holdout:])

    def describe(self) -> dict:
        return {"folder": self.source, "modality": self.modality, "subjects": self.subjects,
                "cases": list(self.cases), "n_slices": int(len(self.images))}


_BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


def subject_of(case_name: str) -> str:
    """The subject of a case (a name relative to the data folder, ``/``-separated): the first BIDS
    ``sub-<label>`` folder of its path, else the file name's ``sub-<label>`` entity, else the case itself
    (one file, one subject)."""
    parts = case_name.split("/")
    for part in parts[:-1]:
        if _BIDS_SUBJECT.fullmatch(part):
            return part
    m = re.match(r"(sub-[A-Za-z0-9]+)(?:_|$)", parts[-1])
    return m.group(1) if m else case_name


def case_subjects(cases: Sequence[Case]) -> list[str]:
    """The subjects of ``cases``, in the order of their first case (the order ``split_holdout`` uses)."""
    return list(dict.fromkeys(subject_of(c.name) for c in cases))


def detect_modality(cases: Sequence[Case], folder: str | Path) -> str:
    kinds = {c.kind for c in cases}
    if len(kinds) > 1:
        raise TrainingDataError(folder, "holds both volumes and 2-D images",
                                "train on one modality per folder (NIfTI volumes or photographs)")
    return "mri" if kinds == {"volume"} else "rgb"


def list_cases(folder: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE, option: str = "--data",
               keep_copies: bool = False, copies: list[str] | None = None) -> list[Case]:
    """Input files of a training folder (recursive, sorted), masks and label maps excluded, byte-identical
    copies of an earlier file dropped (``distinct_content``; ``keep_copies``: kept, as condiff did before;
    ``copies``, when given, receives the dropped case names); ``option`` names the command-line option the
    folder came from in messages."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(folder, "is not a folder", f"give {option} a folder of NIfTI volumes or photographs")
    try:
        cases = discover([folder], exclude_patterns=exclude)
    except InputImageError as exc:
        looked = ", ".join(VOLUME_SUFFIXES + IMAGE_SUFFIXES)
        raise TrainingDataError(folder, f"no training images found (looked for {looked}; masks excluded)",
                                f"give {option} a folder of healthy scans or photographs") from exc
    if keep_copies:
        return cases
    kept = distinct_content(cases)
    if copies is not None:
        names = {c.name for c in kept}
        copies.extend(c.name for c in cases if c.name not in names)
    return kept


def distinct_content(cases: Sequence[Case]) -> list[Case]:
    """``cases`` without byte-identical copies of an earlier case (sorted order; each dropped copy warned
    about). A copy under another name is another subject, so it could be held out for validation while
    its original trains, and a healing metric measured on it would be measured on training data. Only
    files of equal size and equal first and last MiB (``_ends_digest``) are hashed whole, so a cohort of
    uncompressed scans of one shape is not read in full at every start."""
    import stat

    by_size: dict[int, list[Case]] = {}
    for case in cases:
        try:
            st = case.path.stat()
        except OSError:  # a dangling link: its reader names it
            continue
        if stat.S_ISREG(st.st_mode):  # a FIFO (size 0) would be opened and wait forever; its reader names it
            by_size.setdefault(st.st_size, []).append(case)
    copies: set[str] = set()
    candidates: dict[tuple[int, str], list[Case]] = {}
    for size, group in by_size.items():
        if len(group) > 1:
            for case in group:
                candidates.setdefault((size, _readable(case, _ends_digest)), []).append(case)
    for group in candidates.values():
        if len(group) < 2:
            continue
        first: dict[str, Case] = {}
        for case in group:
            digest = _readable(case, file_sha256)
            if digest in first:
                logger.warning("%s: the same bytes as %s; trained on once (a copy under another name would be "
                               "another subject, on either side of the --holdout split)", case.path, first[digest].path)
                copies.add(case.name)
            else:
                first[digest] = case
    return [c for c in cases if c.name not in copies]


def _readable(case: Case, digest_of) -> str:
    try:
        return digest_of(case.path)
    except OSError as exc:
        raise InputImageError(case.path, f"cannot be read ({exc.strerror or exc})") from exc


def _ends_digest(path: Path, span: int = 1 << 20) -> str:
    """A digest of a file's first and last ``span`` bytes: files that differ there are no copies (scans of
    one shape share a header, then differ within the first slices' voxels)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        end = f.seek(0, os.SEEK_END)
        f.seek(max(span, end - span))
        h.update(f.read(span))
    return h.hexdigest()


def _file_identity(path: Path | None) -> list | None:
    if path is None:
        return None
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _cache_key(case: Case, mask: Path | None, cfg: PreprocessConfig) -> str:
    doc = {"v": CACHE_VERSION, "image": _file_identity(case.path), "mask": _file_identity(mask), "cfg": cfg.to_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _training_hints() -> dict[str, str]:
    """The readers' condiff-infer advice (options condiff-train lacks) -> what to do when training."""
    from condiff.io import volumes

    return {volumes.SERIES_HINT: "give one 3-D volume per file (e.g. fslroi IN OUT N 1 keeps volume N of a series)",
            volumes.NONFINITE_HINT: "fix or remove the file; training needs finite voxels"}


def read_training_volume(path: Path, mask: Path | None = None):
    """(volume, mask or None) as ``io.volumes`` reads them, with errors advising what condiff-train can do."""
    from condiff.io import volumes

    try:
        vol = volumes.read_volume(path)
        return vol, (volumes.read_mask(mask, vol) if mask is not None else None)
    except InputImageError as exc:
        # inference's advice (or none, as for an empty volume) -> what to do with a training folder
        hint = _training_hints().get(exc.hint or "", None if exc.hint and exc.hint != "Nothing to analyse"
                                     else "fix the file or remove it from the training data")
        if hint is None:
            raise
        raise InputImageError(exc.path, exc.problem, hint) from exc


def _prepare_case(case: Case, cfg: PreprocessConfig, mask: Path | None) -> np.ndarray:
    """(S, C, H, W) float32 in [0, 1] for one input file."""
    from condiff import preprocess

    if cfg.modality == "mri":
        vol, m = read_training_volume(case.path, mask)
        return preprocess.prepare_volume(vol, cfg, m).slices
    from condiff.io import images

    centred = preprocess.prepare_image(images.read_image(case.path), cfg).slices
    # The tasks run on uncentred [0, 1] images (§1); centring comes back after the task.
    return np.clip(centred * np.float32(0.5) + np.float32(0.5), 0.0, 1.0).astype(np.float32)


CACHE_STEM_BYTES = 180  # of a cache file's name: with the key, ".npy" and a temporary name's extras, < NAME_MAX


def _cached(case: Case, cfg: PreprocessConfig, mask: Path | None, cache_dir: Path | None) -> np.ndarray:
    import io

    from condiff.io.atomic import fit_name, write_bytes_atomic

    if cache_dir is None:
        return _prepare_case(case, cfg, mask)
    # the case's whole relative path flattened: long folder paths would exceed a file name's 255 bytes, so
    # it is cut (the key, a digest of the file's identity, keeps names unique)
    stem = fit_name(case.name.replace("/", "__"), CACHE_STEM_BYTES)
    path = cache_dir / f"{stem}-{_cache_key(case, mask, cfg)}.npy"
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 4 and arr.dtype == np.float32:
                return arr
        except (OSError, ValueError):
            logger.warning("%s: unreadable cache file, rebuilding", path)
    arr = _prepare_case(case, cfg, mask)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    try:  # atomic: a full disk leaves no partial file, and the error names the file
        write_bytes_atomic(path, buf.getvalue())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    return arr


def load_slices(folder: str | Path, cfg: PreprocessConfig, mask_pattern: str | None = None,
                cache_dir: str | Path | None = None, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                progress=None, cases: Sequence[Case] | None = None) -> SliceSet:
    """All healthy slices of ``folder`` under contract ``cfg`` (see module docstring).

    ``mask_pattern`` (``{dir}``, ``{stem}``, ``{case}``; e.g. ``{dir}/{stem}_brainmask.nii.gz``) gives each
    volume its brain mask; it is required when ``cfg.use_mask``. Raises ``TrainingDataError`` naming the
    folder when it holds no usable image, and the reader's ``InputImageError`` for a bad file. ``cases``:
    the folder's ``list_cases`` when the caller has it already (listing again repeats its warnings).
    """
    folder = Path(folder)
    cases = list_cases(folder, exclude) if cases is None else cases
    modality = detect_modality(cases, folder)
    if modality != cfg.modality:
        raise TrainingDataError(folder, f"holds {'volumes' if modality == 'mri' else 'photographs'} but the "
                                f"preprocessing contract is for {cfg.modality!r}", "pass the matching --modality")
    if cfg.use_mask and modality == "mri" and not mask_pattern:
        raise TrainingDataError(folder, "the contract uses a brain mask but no --mask-pattern was given",
                                "pass e.g. --mask-pattern '{dir}/{stem}_brainmask.nii.gz'")
    if mask_pattern and modality == "rgb":
        logger.warning("%s: the mask pattern is not applied to photographs (they are trained on whole, their "
                       "black border included, as the reference does); it applies to volumes", folder)
    cache = Path(cache_dir) if cache_dir is not None else None
    arrays, case_index, names, files = [], [], [], []
    for case in cases:
        mask = find_mask(case, mask_pattern) if (mask_pattern and modality == "mri") else None
        arr = _cached(case, cfg, mask, cache)
        if progress is not None:
            progress(case.name, len(arr))
        if len(arr) == 0:
            logger.warning("%s: no non-empty slice, skipped", case.path)
            continue
        case_index.append(np.full(len(arr), len(names), dtype=np.int64))
        names.append(case.name)
        files.append(str(case.path))
        arrays.append(arr)
    if not arrays:
        raise TrainingDataError(folder, "no non-empty slice in any image", "check the images and their masks")
    return SliceSet(images=np.ascontiguousarray(np.concatenate(arrays)), case=np.concatenate(case_index),
                    cases=names, modality=modality, source=str(folder), files=files)


def _training_cases(cases: Sequence[Case], holdout: int) -> list[Case]:
    """``cases`` without those of the last ``holdout`` subjects: the cases ``SliceSet.split_holdout`` trains on."""
    subjects = case_subjects(cases)
    held = set(subjects[len(subjects) - holdout:]) if holdout > 0 else set()
    return [c for c in cases if subject_of(c.name) not in held]


def fit_training_landmarks(cases: Sequence[Case], cfg: PreprocessConfig, mask_pattern: str | None,
                           holdout: int) -> tuple[float, ...]:
    """Intensity landmarks (``preprocess.fit_landmarks``) of the training scans: ``cases`` without those of
    the last ``holdout`` subjects (the subjects ``SliceSet.split_holdout`` keeps for validation)."""
    from condiff import preprocess

    train = _training_cases(cases, holdout)
    if not train:
        raise TrainingDataError(cases[0].path.parent if cases else "--data", "no training scan to fit landmarks on",
                                "lower --holdout or add scans")

    def pairs():
        for case in train:
            yield read_training_volume(case.path, find_mask(case, mask_pattern) if mask_pattern else None)

    return preprocess.fit_landmarks(pairs(), cfg)


def check_landmark_subjects(cases: Sequence[Case], holdout: int, train_slices: "SliceSet") -> None:
    """The landmarks were fitted on the listed scans minus the held-out ones; make sure those are exactly the
    training subjects (a scan without usable slices would shift the split)."""
    fitted = [c.name for c in _training_cases(cases, holdout)]
    if list(train_slices.cases) != fitted:
        skipped = sorted(set(fitted) - set(train_slices.cases))
        raise TrainingDataError(train_slices.source, f"the landmarks were fitted on scans that are not all training "
                                f"subjects (without usable slices: {', '.join(skipped) or 'none'})",
                                "remove the scans without slices, or train with --no-landmarks")


def load_source_pool(folder: str | Path, image_size: int, cache_dir: str | Path | None = None,
                     mask_pattern: str | None = None, fov_mm: float | None = 192.0) -> SliceSet:
    """Blending sources for task 1 ("other data set") from any folder of volumes or photographs.

    Images keep their own channels (photos 3, MRI 1) in [0, 1] at ``image_size``; the task matches
    channels itself as the reference does (a grey target takes one random colour channel of a photo).
    """
    cases = list_cases(folder, option="--other-data")
    modality = detect_modality(cases, folder)
    if modality == "mri":
        cfg = PreprocessConfig(modality="mri", image_size=image_size, fov_mm=fov_mm, normalisation="percentile",
                               use_mask=bool(mask_pattern))
    else:
        cfg = PreprocessConfig(modality="rgb", image_size=image_size)
    return load_slices(folder, cfg, mask_pattern=mask_pattern, cache_dir=cache_dir, cases=cases)


# ------------------------------------------------------------------------------------------ samples


def draw_diffusion_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                         offset: float = NOISE_OFFSET, n_timesteps: int = N_TRAIN_TIMESTEPS) -> tuple[int, np.ndarray]:
    """t ~ U{0 … n_timesteps−1} and eps = N(0, I) + offset · N(0, 1) per channel, broadcast over H×W.

    Draw order (so a float64 hand computation can replay it): t, the (C, H, W) normals, the (C, 1, 1)
    offset normals; all float64, eps cast to float32 at the end.
    """
    t = int(rng.integers(0, n_timesteps))
    base = rng.standard_normal(shape)
    off = rng.standard_normal((shape[0], 1, 1))
    return t, (base + offset * off).astype(np.float32)


def sample_streams(seed: int, stream: int, epoch: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(task generator, noise generator) owned by one sample key (§10 D4)."""
    task_ss, noise_ss = np.random.SeedSequence([int(seed), int(stream), int(epoch), int(index)]).spawn(2)
    return np.random.default_rng(task_ss), np.random.default_rng(noise_ss)


class TaskSamples(torch.utils.data.Dataset):
    """Key ``(epoch, index)`` -> dict of tensors for one training (or validation) sample.

    ``x0`` (C, H, W) clean, ``cond`` (C, H, W) corrupted (both centred to [-1, 1] when ``centre``),
    ``mask`` (H, W) bool synthetic anomaly mask, ``task`` int (−1 = no task), ``t`` int64, ``eps``
    (C, H, W) float32. ``task``: a ``RestorationTask``-like callable (image, rng) -> (corrupted, mask, id).
    ``size_scale_at``: optional ``epoch -> scale`` (``train/curriculum.py``), passed to the task as
    ``size_scale``; it depends on the key only, so resumed runs draw the same samples.
    """

    def __init__(self, images: np.ndarray, task, seed: int, stream: int = TRAIN_STREAM, centre: bool = False,
                 noise_offset: float = NOISE_OFFSET, n_timesteps: int = N_TRAIN_TIMESTEPS,
                 size_scale_at=None):
        self.images = images
        self.task = task
        self.seed = int(seed)
        self.stream = int(stream)
        self.centre = centre
        self.noise_offset = noise_offset
        self.n_timesteps = n_timesteps
        self.size_scale_at = size_scale_at

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        image = np.asarray(self.images[index], dtype=np.float32)
        task_rng, noise_rng = sample_streams(self.seed, self.stream, epoch, index)
        if self.size_scale_at is None:
            cond, mask, task_id = self.task(image, task_rng)
        else:
            cond, mask, task_id = self.task(image, task_rng, size_scale=float(self.size_scale_at(epoch)))
        t, eps = draw_diffusion_noise(noise_rng, image.shape, self.noise_offset, self.n_timesteps)
        x0 = image
        if self.centre:
            x0 = x0 * np.float32(2.0) - np.float32(1.0)
            cond = cond * np.float32(2.0) - np.float32(1.0)
        return {"x0": torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32)),
                "cond": torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32)),
                "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
                "task": torch.tensor(-1 if task_id is None else int(task_id)),
                "t": torch.tensor(t, dtype=torch.int64),
                "eps": torch.from_numpy(eps)}


class StepBatchSampler(torch.utils.data.Sampler):
    """Endless per-step batches of keys ``(epoch, index)`` for one rank (see module docstring).

    ``start``: position in the sample stream where step 0 of this iterator begins (the data-order state
    saved in checkpoints). ``shuffle=False`` walks 0…n−1 in order every epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError("StepBatchSampler needs at least one sample")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start, self.rank, self.world_size, self.shuffle = int(start), int(rank), int(world_size), shuffle
        self._perms: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2, epoch]))
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def keys_at(self, position: int, count: int) -> list[tuple[int, int]]:
        out = []
        for p in range(position, position + count):
            epoch, i = divmod(p, self.n)
            out.append((epoch, int(self._perm(epoch)[i])))
        return out

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        """Keys of this rank's batch ``step`` steps after ``start``."""
        return self.keys_at(self.start + step * self.global_batch + self.rank * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = 0
        while True:
            yield self.batch_for_step(step)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2**62


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
