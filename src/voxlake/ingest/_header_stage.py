"""Stage 1 of an ingest run: list the sources, parse headers on the workers, commit the
instance and failure rows as tasks complete (never appending a file twice, whatever other
runs commit meanwhile)."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from voxlake.catalog.concurrent import ForeignRows
from voxlake.catalog.query import open_catalog
from voxlake.catalog.tables import rows_to_table
from voxlake.errors import CatalogError, SourceError, VoxlakeError
from voxlake.ingest._run_state import APPEND_ATTEMPTS, RETRYABLE_CODES, RunState, sql_list
from voxlake.ingest.archives import archive_of
from voxlake.ingest.headers import HeaderBatch, catalog_headers, failure_row
from voxlake.ingest.report import ProgressEvent
from voxlake.ingest.sources import is_under, iter_file_batches, recorded_source, source_root

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

    from voxlake.ingest.sources import FileRef


def _merge_batches(batches: list[HeaderBatch]) -> HeaderBatch:
    """One batch holding the rows of several header tasks (committed together)."""
    if len(batches) == 1:
        return batches[0]
    merged = HeaderBatch(table=pa.concat_tables([_table(b) for b in batches]))
    for batch in batches:
        merged.failures += batch.failures
        merged.bytes_read += batch.bytes_read
        merged.key_map += batch.key_map
        merged.pixel_spans.update(batch.pixel_spans)
        merged.kept.update(batch.kept)
    return merged


def _table(batch: HeaderBatch) -> pa.Table:
    """The batch's instance rows as the catalog's Arrow table."""
    return batch.table if batch.table is not None else rows_to_table("instances", batch.instances)


def header_task_size(files: int, *, batch_size: int, threads: int) -> int:
    """Files per header task, for `files` new files of one listing batch.

    Each task costs the driver about 10 ms (submit, schedule, fetch and unpickle its
    result) and its worker a few, so tasks are a quarter of a commit batch, up to 256
    files: that keeps the driver from limiting a large cluster (64-file tasks cost it
    twice as much). A task's high-water mark stays in its worker into the volume stage:
    256-file tasks are affordable because workers give Arrow the system allocator
    (``voxlake.cluster.WORKER_MALLOC_ENV``); with mimalloc they left each worker's peak
    15 MB higher (2.05x the benchmark's largest volume). Fewer files than a commit batch
    (a small run, a re-run with few changes, the end of the listing) are split so that
    each worker thread gets two tasks of at least 16 files, lest one worker parse while
    the others idle.
    """
    largest = min(256, max(16, batch_size // 4))
    if files >= batch_size:
        return largest
    return min(largest, max(16, -(-files // (2 * max(1, threads)))))


#: Files of one PACS series in one header task at most (beyond, it is split).
PACS_SERIES_TASK_FILES = 4096


def _series_of(locator: str) -> str:
    """``.../studies/S/series/R`` of a PACS instance's locator (DICOMweb or DIMSE)."""
    return locator.rsplit("/instances/", 1)[0]


def header_tasks(refs: list[FileRef], size: int) -> Iterator[list[FileRef]]:
    """The files of header tasks of about `size` files each.

    A PACS series stays in one task (up to :data:`PACS_SERIES_TASK_FILES` files), with
    other small series as long as the task stays within `size`: its worker keeps the
    instances it retrieved, and the series' volume task runs there without asking the
    PACS again (:mod:`voxlake.ingest.fetched`).
    """
    files = [ref for ref in refs if ref.locator is None]
    for start in range(0, len(files), size):
        yield files[start : start + size]
    series: dict[str, list[FileRef]] = {}
    for ref in refs:
        if ref.locator is not None:
            series.setdefault(_series_of(ref.locator), []).append(ref)
    task: list[FileRef] = []
    for group in series.values():
        if len(group) > PACS_SERIES_TASK_FILES:
            for start in range(0, len(group), PACS_SERIES_TASK_FILES):
                yield group[start : start + PACS_SERIES_TASK_FILES]
            continue
        if task and len(task) + len(group) > size:
            yield task
            task = []
        task += group
    if task:
        yield task


#: URLs per delete predicate when pruning.
_PRUNE_CHUNK = 5000


class HeaderStage(RunState):
    """The header pass of a run."""

    failed_archives: set[str]  # failed subjects that may be archives: see seen_files

    def seen_files(self) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[int, float]]]:
        catalog = open_catalog(self.catalog_url, storage_options=self.catalog_options)
        # What other runs commit from this snapshot on (concurrent ingests): see _append_new.
        self.foreign = ForeignRows(
            self.catalog_url, "instances", run_id=self.run_id, key="url",
            columns=("url", "size", "mtime"), version=catalog.table_versions.get("instances"),
            storage_options=self.catalog_options,
        )  # fmt: skip
        inst = catalog.read("instances", columns=["url", "size", "mtime"])
        fails = catalog.read(
            "failures", columns=["subject", "subject_kind", "size", "mtime", "code"]
        )
        fails = fails[fails["subject_kind"] == "file"]
        retry = fails["code"].isin(RETRYABLE_CODES)  # never "unchanged": read them again
        fails = fails.assign(
            size=fails["size"].where(~retry, -1), mtime=fails.mtime.where(~retry, -1)
        )
        # Failed files that are no archive member: the archives among them that list
        # cleanly in this run have their rows cleared (_heal_archives).
        self.failed_archives = {u for u in fails.subject if archive_of(u) is None}
        ok = {
            u: (int(s), float(m))
            for u, s, m in zip(inst.url, inst["size"], inst.mtime, strict=True)
        }
        bad = {
            u: (int(s), float(m))
            for u, s, m in zip(fails.subject, fails["size"], fails.mtime, strict=True)
            if s == s and m == m  # not NaN
        }
        return ok, bad

    def headers(self, client: Any) -> None:
        from distributed import as_completed

        ok, bad = self.seen_files()  # catalogued before this run: see _note_missing too
        seen: set[str] = set()  # every URL this run's listing yielded (filled by it)
        trouble: set[str] = set()  # where the listing hit a problem
        pending = as_completed()
        listed: set[str] = set()  # archives with members in this run's listing
        submitted = 0
        done = 0
        # Results are committed a batch at a time, whatever the tasks' size.
        threads = sum(client.nthreads().values())  # of all workers: one task each at a time
        results: list[HeaderBatch] = []

        def collect(batch: HeaderBatch, *, flush: bool = False) -> None:
            nonlocal done
            results.append(batch)
            rows = sum(_table(b).num_rows + len(b.failures) for b in results)
            if rows >= self.config.batch_size or flush:
                done += self._commit_headers(_merge_batches(results), ok, bad)
                results.clear()
                self.progress(ProgressEvent("headers", done, submitted, self.report.bytes_read))

        for files, problems in iter_file_batches(
            self.sources,
            batch_size=self.config.batch_size,
            storage_options=self.config.storage_options,
            max_member_bytes=self.config.max_file_bytes,
            secret=self.secret,
            listed=seen,
        ):
            self.report.files_seen += len(files)
            trouble.update(p.url for p in problems)
            listed.update(filter(None, map(archive_of, (f.url for f in files))))
            self.damaged_archives.update(p.url for p in problems if p.code == "corrupt_archive")
            self.locators.update((f.url, f.locator) for f in files if f.locator)
            fresh = [f for f in files if ok.get(f.url, bad.get(f.url)) != (f.size, f.mtime)]
            self.report.files_skipped += len(files) - len(fresh)
            if problems:
                rows = [
                    failure_row(
                        subject=p.url,
                        subject_kind="file",
                        error=VoxlakeError(p.message, code=p.code),
                        run_id=self.run_id,
                        stage="file",
                    )
                    for p in problems
                ]
                self.count_failures(rows)
                self.commit({"failures": rows}, "listing")
            size = header_task_size(len(fresh), batch_size=self.config.batch_size, threads=threads)
            for task in header_tasks(fresh, size):
                pending.add(
                    client.submit(
                        catalog_headers,
                        task,
                        secret=self.secret,
                        config=self.config,
                        run_id=self.run_id,
                        pure=False,
                    )
                )
            submitted += len(fresh)
            self.progress(ProgressEvent("files", self.report.files_seen, None))
            while pending.has_ready():
                collect(next(pending).result())
        for future in pending:
            collect(future.result())
        if results:
            collect(HeaderBatch(), flush=True)
        self._heal_archives(listed - self.damaged_archives)
        seen.update(listed)  # archives listed whole are seen too (and problems, listed)
        self._note_missing((ok, bad), seen, trouble | self.damaged_archives)

    def _note_missing(
        self, known: tuple[dict[str, Any], ...], seen: set[str], trouble: set[str]
    ) -> None:
        """Find the catalogued files under this run's sources that the listing did not
        yield: deleted, moved or renamed since they were catalogued (:meth:`prune` drops
        them). A source that listed nothing (an empty folder, a share not mounted) is left
        out, and so is whatever lies under a folder or archive the listing could not read
        whole: absence there proves nothing."""
        roots: list[str] = []
        for source in self.sources:
            root = source_root(source, self.config.storage_options)
            if root is None:  # a PACS query
                continue
            if any(is_under(url, root) for url in seen):
                roots.append(root)
            else:
                self.report.empty_sources.append(recorded_source(source))
        self.missing = sorted(
            {
                url
                for urls in known  # catalogued before this run, as dicts keyed by URL
                for url in urls
                if url not in seen
                and any(is_under(url, root) for root in roots)
                and not any(is_under(url, place) for place in trouble)
            }
        )
        self.report.files_missing = len(self.missing)

    def prune(self) -> None:
        """Delete the rows (instances and file failures) of the files the listing did not
        find (:meth:`_note_missing`), in one catalog commit. The volume stage then retires
        or rebuilds the volumes built from them."""
        if not self.config.prune or not self.missing:
            return
        for start in range(0, len(self.missing), _PRUNE_CHUNK):
            urls = sql_list(self.missing[start : start + _PRUNE_CHUNK])
            self.writer.delete("instances", f"url IN ({urls})", run_id=self.run_id)
            self.writer.delete(
                "failures", f"subject_kind = 'file' AND subject IN ({urls})", run_id=self.run_id
            )
        self.report.catalog_version = self.writer.record_commit(
            run_id=self.run_id, operation="prune"
        )
        self.report.files_pruned = len(self.missing)

    def _heal_archives(self, clean: set[str]) -> None:
        """Clear the failure rows of archives that failed before and list cleanly now (a
        damaged archive replaced by a good copy)."""
        healed = sorted(clean & self.failed_archives)
        if healed:
            self.writer.delete(
                "failures",
                f"subject_kind = 'file' AND subject IN ({sql_list(healed)})",
                run_id=self.run_id,
            )
            self.report.catalog_version = self.writer.record_commit(
                run_id=self.run_id, operation="listing"
            )

    def _commit_headers(self, batch: HeaderBatch, ok: dict[str, Any], bad: dict[str, Any]) -> int:
        if self.key_map is not None and batch.key_map:
            self.key_map.write(batch.key_map, run_id=self.run_id)  # before keys reach the catalog
        table = _table(batch)
        urls = table.column("url").to_pylist()
        self.report.bytes_read += batch.bytes_read
        self.report.instances += len(urls)
        if not self.config.headers_only:  # no volume task of this run will read them
            self.pixel_spans.update(batch.pixel_spans)
            self.kept.update(batch.kept)
        self.count_failures(batch.failures)
        self.count_warnings(pc.list_flatten(table.column("warnings")).to_pylist())
        self._absorb(self.foreign.poll(), ok)
        # A file that now parses clears its old failure; one that now fails loses its row.
        healed = [u for u in urls if u in bad]
        broken = [r["subject"] for r in batch.failures if r["subject"] in ok]
        if healed:
            self.writer.delete("failures", f"subject IN ({sql_list(healed)})", run_id=self.run_id)
        if broken:
            self.writer.delete("instances", f"url IN ({sql_list(broken)})", run_id=self.run_id)
        # The poll above is current unless this run just changed `instances` itself.
        appended = self._append_new(table, urls, ok, polled=not broken)
        changed = table.filter(
            pa.array([u in ok and u not in appended for u in urls], type=pa.bool_())
        )
        self.commit({"instances": changed, "failures": batch.failures}, "headers")
        if (appended or healed or broken) and not (changed.num_rows or batch.failures):
            self.report.catalog_version = self.writer.record_commit(
                run_id=self.run_id, operation="headers"
            )
        return len(urls) + len(batch.failures)

    def _append_new(
        self, table: pa.Table, urls: list[str], ok: dict[str, Any], *, polled: bool
    ) -> set[str]:
        """Append the rows (`table`, whose URLs are `urls`) of files no run has
        catalogued; return their URLs.

        The append lands only if nobody committed to ``instances`` since the poll that
        decided what is new; otherwise the rows another run added meanwhile are absorbed
        (merged as changed rows instead) and the rest tried again. Two concurrent runs can
        therefore never both append one file, not even for one table version.
        """
        for attempt in range(1, APPEND_ATTEMPTS + 1):
            if attempt > 1 or not polled:
                self._absorb(self.foreign.poll(), ok)
            new = [u not in ok for u in urls]
            if not any(new):
                return set()
            fresh = table.filter(pa.array(new, type=pa.bool_()))
            version = self.writer.append_if_current(
                "instances", fresh, run_id=self.run_id, version=self.foreign.version
            )
            if version is not None:
                ok.update(
                    (u, (int(s), float(m)))
                    for u, s, m in zip(
                        fresh.column("url").to_pylist(),
                        fresh.column("size").to_pylist(),
                        fresh.column("mtime").to_pylist(),
                        strict=True,
                    )
                )
                return {u for u, n in zip(urls, new, strict=True) if n}
            time.sleep(random.uniform(0.01, 0.05) * attempt)  # another run committed: look again
        raise CatalogError(
            f"could not append to 'instances' in {APPEND_ATTEMPTS} attempts: other writers"
            " kept committing in between",
            code="catalog_contended",
            hint="run again; fewer concurrent ingests into one catalog commit sooner",
        )

    @staticmethod
    def _absorb(rows: pd.DataFrame, ok: dict[str, Any]) -> None:
        """Files another run catalogued meanwhile: merged, not appended, from now on."""
        ok.update(
            (u, (int(s), float(m)))
            for u, s, m in zip(rows["url"], rows["size"], rows["mtime"], strict=True)
        )

    def check_sources(self) -> None:
        """Files the source stopped delivering could be slices of any series: building
        volumes now could store a series without them. Stop instead; a re-run reads them."""
        unread = self.codes.get("source_unreachable", 0)
        if unread:
            raise SourceError(
                f"{unread} files could not be read (the source stopped answering);"
                " no volume was built",
                code="source_unreachable",
                hint="run the same command again when the source answers",
            )
