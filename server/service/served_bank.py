"""The bank the adaptation service serves, reloaded when the federation writes a new version.

The service may start before the first federation has finished (a fresh deployment): it then has
no bank and says so (health NOT_SERVING for the Fusion service, UNAVAILABLE on calls) until one
appears. Banks are written atomically (a new folder swapped in for the old), so a reader sees
the old version, the new one or, for an instant, none: a failed reload keeps serving the version
it has and tries again at the next check.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from protofuse import artifacts
from protofuse.adapted import BankPrefix
from protofuse.bank import RUN_BANK, RUN_MANIFEST, Bank, load_bank
from protofuse.protocol import federation as wire
from protofuse.protocol.service import (
    BankInfo,
    ExpertList,
    ExpertSummary,
    encode_bank_info,
    encode_expert_list,
)
from protofuse.records import NOT_MEASURED

log = logging.getLogger("protofuse.service")


@dataclass(frozen=True)
class Snapshot:
    """One loaded bank version and what the service publishes about it."""

    bank: Bank
    manifest: wire.BankManifest
    experts: ExpertList
    bank_weights_digest: str  # sha256 of the .npz of the bank's arrays as adapted models store them
    written_at: float = 0.0  # when its meta.json was written (seconds since the epoch)
    # The bank's arrays as every adapted model's weights.npz begins, hashed once per version.
    prefix: BankPrefix | None = None


class ServedBank:
    """Thread-safe holder of the current bank version; ``get()`` reloads when the files changed."""

    def __init__(self, path: str | os.PathLike, check_interval: float = 2.0) -> None:
        path = Path(path)
        # A bank folder, or a run folder whose bank/ may not exist yet.
        self.bank_dir = path if (path / artifacts.META).exists() else path / RUN_BANK
        self.run_dir = self.bank_dir.parent if self.bank_dir.name == RUN_BANK else None
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._stamp: tuple | None = None
        self._checked = -math.inf
        self.error: str | None = None  # why the bank's current files could not be loaded
        self.get()

    def get(self) -> Snapshot | None:
        """The current version, after a reload if the bank's files changed since the last check."""
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return self._snapshot
        with self._lock:
            if now - self._checked < self.check_interval:  # another thread checked meanwhile
                return self._snapshot
            self._checked = now
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._reload(stamp)
            return self._snapshot

    def _file_stamp(self) -> tuple | None:
        try:
            st = (self.bank_dir / artifacts.META).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self, stamp: tuple) -> None:
        try:
            bank = load_bank(self.bank_dir)
            manifest = self._manifest(bank)
            prefix = BankPrefix.of(bank.model)
            snapshot = Snapshot(
                bank,
                manifest,
                _experts(bank, manifest),
                prefix.prefix.whole_sha256,
                stamp[1] / 1e9,
                prefix,
            )
            # What GetBank and ListExperts will send, encoded once: a bank whose description
            # does not encode (a forged expert distribution) is refused here, never served.
            encode_expert_list(snapshot.experts)
            encode_bank_info(BankInfo(snapshot.manifest, bank.meta.x_dim))
        except Exception as err:
            self.error = str(err).splitlines()[0][:500]
            log.warning(
                "bank in %s not loaded (%s); still serving %s",
                self.bank_dir,
                err,
                self._snapshot.bank.version if self._snapshot else "nothing",
            )
            self._stamp = stamp  # not retried until its files change again
            return
        previous = self._snapshot.bank.version if self._snapshot else None
        self._snapshot, self._stamp, self.error = snapshot, stamp, None
        if previous != bank.version:
            log.info(
                "serving bank %s (%d labels, %d experts)%s",
                bank.version,
                len(bank.label_names),
                len(bank.experts),
                f", replacing {previous}" if previous else "",
            )

    def _manifest(self, bank: Bank) -> wire.BankManifest:
        """The federation's published manifest when it describes this version, else one from the
        bank."""
        if self.run_dir is not None and (self.run_dir / RUN_MANIFEST).exists():
            try:
                manifest = wire.decode_manifest((self.run_dir / RUN_MANIFEST).read_bytes())
                if manifest.version == bank.version:
                    return manifest
            except (wire.WireError, OSError):
                pass  # a manifest from another version or damaged: describe the bank itself
        return manifest_of_bank(bank)


def manifest_of_bank(bank: Bank) -> wire.BankManifest:
    """A manifest for a bank without one (``protofuse fit`` output): its records as the server knows
    them."""
    if bank.meta.sha256 is None:
        raise ValueError(
            "the bank is unsaved: save it (or load it) before describing it in a manifest"
        )
    rounds = bank.meta.federated_rounds
    return wire.BankManifest(
        bank.version,
        rounds,
        bank.label_names,
        bank.meta.sha256,
        bank.family,
        tuple(_manifest_expert(e, rounds) for e in bank.experts),
    )


def _manifest_expert(e: wire.ExpertRecord, rounds: int) -> wire.ExpertRecord:
    f = e.fidelity
    measured = f.n > 0 and math.isfinite(f.agreement) and math.isfinite(f.kl)
    fidelity = (
        wire.Fidelity(f.agreement, max(f.kl, 0.0), f.n) if measured else wire.Fidelity(0.0, 0.0, 0)
    )
    consensus = e.consensus if math.isfinite(e.consensus) else NOT_MEASURED
    trust = min(max(e.weight, 0.0), 1.0)
    return wire.ExpertRecord(
        e.name,
        e.labels,
        fidelity,
        e.n_queries,
        consensus,
        trust,
        n_examples=e.n_queries,
        last_round=rounds,
    )


def _experts(bank: Bank, manifest: wire.BankManifest) -> ExpertList:
    index = {e.name: i for i, e in enumerate(bank.experts)}
    impl = bank.family_impl
    return ExpertList(
        bank.version,
        tuple(
            ExpertSummary(m, impl.describe_expert(bank, index[m.pseudonym]))
            for m in manifest.experts
            if m.pseudonym in index
        ),
    )
