"""The `gemini` backend: Nano Banana and its kin through the official `google-genai` SDK, online or by Batch API.

Each row is one `generateContent` request: the task prompt as text and the
image as inline PNG data, image output asked for (`response_modalities:
[IMAGE]`), the row's seed in the generation config (`model.options` adds to
or overrides it: temperature, image_config, safety_settings, ...).
(About 500 lines, one module: the online and Batch API paths share the request,
the answer parsing and the key masking, and read best side by side.)

- Online (`model.mode: online`): at most `model.concurrency` requests in
  flight; 429 and 5xx (and timeouts, connection errors) are retried
  `model.max_retries` times with backoff, and a 429's `google.rpc.RetryInfo`
  `retryDelay` (or a `Retry-After` header) is honoured up to 60 s. The SDK's
  own retry stays off, as it does not read RetryInfo.
- Batch (`model.mode: batch`): the rows of one model call (`model.batch_size`,
  split at `model.batch_max_requests` and the File API's 2 GB) become the lines
  of a JSONL file, `{"key": ..., "request": GenerateContentRequest}`, uploaded
  through the SDK's file API, and one Batch API job per file is created,
  polled with growing waits (`model.batch_poll_s`, up to 10x; a progress bar
  on a terminal), and its results file downloaded and matched back to rows by
  key. A key is the task, the row's seed (a hash of the row id) and a digest
  of the request (model, prompt, options, image): one per row, task and pass.
  Every job is recorded under the output (`<output>/_vb/hosted/gemini-*.json`)
  before it is created, with a display name unique to the call, and again with
  its name once created, so a run killed while its jobs run re-attaches to them
  on resume (`output.mode: resume`) instead of paying for them twice; a job whose
  run was killed between its creation and the record of its name is found by its
  display name in the service's list of batch jobs (`batches.list`). A run that
  stops for another reason ends its polls at once (`cancel_calls`, from the model
  stage's close): the jobs run on at the service and a resume re-attaches.
- Answers: the last image part that is not a thought. No image part, a
  blocked prompt (`promptFeedback.blockReason`), a safety finish reason, or
  any finish reason other than STOP is that row's `vb_error`:
  `model_safety_block`, `model_no_image`; a request that kept failing
  `model_rate_limited` (429) or `model_http_error`; a batch job that failed,
  was cancelled or did not answer a row `model_batch_failed`, one that expired
  `model_batch_expired`, one still running after `model.batch_timeout_s`
  `model_batch_pending` (resume to re-attach). Answers may come at the model's
  own size: they are counted in `answer_sizes` and mapped back to the input's
  size by the decode stage.
- Keys: from the environment variable `model.token_env` (sent as
  `x-goog-api-key` by the SDK), kept in memory only and masked out of anything
  a server says back. Vertex AI: `model.vertex: true` with `model.project` and
  `model.location` (Application Default Credentials), or an express-mode key.

Example (the key in $GEMINI_API_KEY):

    model:
      backend: gemini
      model_name: gemini-2.5-flash-image
      token_env: GEMINI_API_KEY
      mode: batch
      batch_size: 500
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import logging
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np

from vb_batch.config import ConfigError
from vb_batch.errors import RowError
from vb_batch.models.hosted import (
    RETRY_STATUS,
    Failure,
    HostedBackend,
    answer_image,
    api_key,
    parse_retry_after,
    with_retries,
)
from vb_batch.models.hosted_limits import Fit, crop_answer
from vb_batch.models.http import server_text
from vb_batch.models.options import GeminiOptions

log = logging.getLogger(__name__)

# Finish reasons and prompt block reasons that mean a policy refused the answer.
SAFETY_REASONS = frozenset({
    "SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "OTHER",
})
FINISHED = frozenset({"", "STOP", "FINISH_REASON_UNSPECIFIED"})
# Batch job states (the SDK's names); a job in none of these is still pending or running.
SUCCEEDED = "JOB_STATE_SUCCEEDED"
EXPIRED = "JOB_STATE_EXPIRED"
FAILED_STATES = frozenset({"JOB_STATE_FAILED", "JOB_STATE_CANCELLED", EXPIRED})
DONE_STATES = FAILED_STATES | {SUCCEEDED}
# The File API's limit per file (documented: 2 GB); a batch's JSONL is split below it.
BATCH_FILE_MAX_BYTES = 2_000_000_000
# Request options that sit beside generationConfig in a GenerateContentRequest, not inside it.
REQUEST_LEVEL_OPTIONS = frozenset({"safety_settings", "system_instruction", "tools", "tool_config", "cached_content"})
MAX_POLL_FACTOR = 10
LIST_PAGE_SIZE = 100  # batch jobs per page when a resume looks for a job it created but did not record


def _text(value: Any) -> str:
    """An enum or string field of an answer as its name ("STOP")."""
    return str(getattr(value, "value", value) or "")


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _rest_json(options: Any) -> Any:
    """Config options (snake_case, as the SDK takes them) in the REST API's JSON spelling (camelCase keys)."""
    if isinstance(options, dict):
        return {_camel(str(k)): _rest_json(v) for k, v in options.items()}
    if isinstance(options, list):
        return [_rest_json(v) for v in options]
    return options


def usage_of(response) -> dict[str, int] | None:
    """The tokens a `GenerateContentResponse` was billed (`usageMetadata`): prompt, candidates, thoughts."""
    meta = getattr(response, "usage_metadata", None)
    if meta is None:
        return None
    return {"input_tokens": meta.prompt_token_count or 0, "output_tokens": meta.candidates_token_count or 0,
            "thought_tokens": meta.thoughts_token_count or 0}


def daily_quota(exc) -> bool:
    """Whether a 429's google.rpc.QuotaFailure names a per-day quota (waiting minutes does not help)."""
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    for detail in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                if "PerDay" in str(violation.get("quotaId", "")) or "per_day" in str(violation.get("quotaMetric", "")):
                    return True
    return False


def read_answer(response) -> np.ndarray | RowError:
    """The painting in a `GenerateContentResponse`, or the row's RowError saying why there is none."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason:
        why = _text(feedback.block_reason)
        message = f"; {server_text(feedback.block_reason_message)}" if feedback.block_reason_message else ""
        return RowError("model_safety_block", f"the prompt was blocked ({why}){message}")
    if not response.candidates:
        return RowError("model_no_image", "the answer has no candidates")
    candidate = response.candidates[0]
    finish = _text(candidate.finish_reason)
    if finish in SAFETY_REASONS:
        return RowError("model_safety_block", f"the answer was withheld (finish reason {finish})")
    parts = (candidate.content.parts if candidate.content else None) or []
    images = [p.inline_data for p in parts
              if p.inline_data is not None and not p.thought and (p.inline_data.mime_type or "").startswith("image/")]
    said = " ".join(p.text for p in parts if p.text and not p.thought)
    said = f"; the model said: {server_text(said)}" if said else ""
    if finish not in FINISHED:
        return RowError("model_no_image", f"the answer stopped early (finish reason {finish}){said}")
    if not images or not images[-1].data:
        return RowError("model_no_image", f"the answer has no image part{said}")
    try:
        return answer_image(images[-1].data)
    except RowError as err:
        return err


class GeminiBackend(HostedBackend):
    name = "gemini"
    options_model = GeminiOptions

    def __init__(self, cfg):
        super().__init__(cfg)  # checks the options' problems (model.model_name, mode batch on Vertex AI)
        self._api_key = api_key(cfg, required=not cfg.vertex)
        if cfg.vertex and not self._api_key and not (cfg.project and cfg.location):
            raise ConfigError("model.project: Vertex AI needs model.project and model.location "
                              "(or model.token_env naming an express-mode API key)")
        if cfg.mode == "batch" and not cfg.state_url:
            raise ConfigError("model.state_url: batch mode records its jobs under the output (<output>/_vb/hosted);"
                              " set output.path, or model.state_url to a folder of your own")
        self._secrets |= {self._api_key} if self._api_key else set()
        self._client = None
        self._batches: BatchJobs | None = None

    @classmethod
    def needs_state_dir(cls, cfg) -> bool:
        return cfg.mode == "batch"

    @classmethod
    def request_mode(cls, cfg) -> str:
        return cfg.mode

    @classmethod
    def provenance(cls, cfg) -> str:
        revision = f"@{cfg.revision}" if cfg.revision else ""
        return super().provenance(cfg).removesuffix(revision) + ("+vertex" if cfg.vertex else "") + revision

    def __repr__(self) -> str:  # never the key
        return f"GeminiBackend({self.cfg.model_name!r}, mode={self.cfg.mode!r})"

    def __getstate__(self):
        state = super().__getstate__()
        state["_client"], state["_batches"] = None, None
        return state

    @property
    def shown(self) -> str:
        return f"gemini {self.cfg.model_name}"

    def client(self):
        """The SDK client, built on first use (and in each worker: it does not pickle)."""
        with self._pool_lock:  # built once: a client dropped by a racing thread closes the shared transport
            return self._build_client()

    def _build_client(self):
        if self._client is None:
            from google import genai
            from google.genai import types

            options = types.HttpOptions(base_url=self.cfg.endpoint, timeout=int(self.cfg.timeout_s * 1000))
            if self.cfg.vertex:
                self._client = genai.Client(vertexai=True, api_key=self._api_key, project=self.cfg.project,
                                            location=self.cfg.location, http_options=options)
            else:
                self._client = genai.Client(api_key=self._api_key, http_options=options)
        return self._client

    def generation_options(self, seed: int, fit: Fit | None = None) -> dict[str, Any]:
        """The generation config of one row (snake_case, as `GenerateContentConfig` takes it).

        Where the model answers in fixed aspect ratios, the row asks for the one its image was padded to.
        """
        # Gemini's seed is an int32.
        options = {"response_modalities": ["IMAGE"], "seed": seed % 2**31, **self.cfg.options}
        if fit is not None and fit.aspect and self.limits.ratios:
            options["image_config"] = {**(options.get("image_config") or {}), "aspect_ratio": fit.aspect}
        return options

    @property
    def calls_in_flight(self) -> int:
        """Batch mode: model calls (each one batch job) submitted and polled at once."""
        return self.cfg.batch_jobs_in_flight if self.cfg.mode == "batch" else 1

    # ------------------------------------------------------------------ online

    def predict(self, images, prompts, task, seeds):
        if self.cfg.mode != "batch":
            return super().predict(images, prompts, task, seeds)
        with self._pool_lock:
            if self._batches is None:
                self._batches = BatchJobs(self)
        answers = self._batches.answers(images, prompts, task, seeds)
        self.count_answer_sizes(images, answers)
        return answers

    def _answer_row(self, image, prompt, task, seed):
        from google.genai import types

        data, mime, fit = self.prepare(image, prompt)
        contents = [types.Part.from_text(text=prompt), types.Part.from_bytes(data=data, mime_type=mime)]
        config = types.GenerateContentConfig(**self.generation_options(seed, fit))
        response = with_retries(
            lambda: self.limited(lambda: self.client().models.generate_content(
                model=self.cfg.model_name, contents=contents, config=config)),
            self.classify, self.cfg, self.shown,
        )
        if isinstance(response, RowError):
            return response
        self.record_usage(seed, usage_of(response))
        answer = read_answer(response)
        return RowError(answer.code, self._scrub(answer.message)) if isinstance(answer, RowError) \
            else crop_answer(answer, fit)

    def classify(self, exc: Exception) -> Failure | None:
        """A failed SDK call: retryable or not, the server's wait (RetryInfo, Retry-After), the row's code."""
        from google.genai import errors

        if isinstance(exc, errors.APIError):
            reason = f"HTTP {exc.code} {exc.status or ''}".rstrip()
            if exc.message:
                reason += f": {server_text(exc.message)}"
            if exc.code == 429 and daily_quota(exc):
                self.quota_exhausted(f"{self.shown}: {self._scrub(reason)} (the quota for the day)")
            return Failure(
                reason=self._scrub(reason),
                retryable=exc.code in RETRY_STATUS,
                code="model_rate_limited" if exc.code == 429 else "model_http_error",
                server_wait_s=server_wait(exc),
            )
        if isinstance(exc, transport_errors()):
            return Failure(f"{type(exc).__name__}: {self._scrub(server_text(str(exc)))}", retryable=True)
        return None

    # ------------------------------------------------------------------ batch

    def batch_request(self, image: np.ndarray, prompt: str, seed: int) -> tuple[dict[str, Any], Fit]:
        """One `GenerateContentRequest` in the REST API's JSON, as a batch file's line carries it, and its fit."""
        data, mime, fit = self.prepare(image, prompt)
        options = self.generation_options(seed, fit)
        request: dict[str, Any] = {
            "contents": [{"role": "user", "parts": [
                {"text": prompt},
                {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode("ascii")}},
            ]}],
        }
        for name in REQUEST_LEVEL_OPTIONS & set(options):
            request[_camel(name)] = _rest_json(options.pop(name))
        request["generationConfig"] = _rest_json(options)
        return request, fit


def transport_errors() -> tuple[type[Exception], ...]:
    """Connection faults and timeouts of the SDK's HTTP client (httpx, or its fork httpx2, whichever is there)."""
    found = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except ImportError:
            pass
    return tuple(found)


def server_wait(exc) -> float | None:
    """How long the server asked the client to wait: a RetryInfo `retryDelay` in the error's details, or Retry-After."""
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    for detail in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            wait = parse_retry_after(detail.get("retryDelay"))
            if wait is not None:
                return wait
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return parse_retry_after(headers.get("retry-after")) if headers is not None else None


def request_key(task: str, seed: int, digest_of: bytes) -> str:
    """A request's key: the task, the row's seed (a hash of the row id) and a digest of what was asked."""
    return f"{task}-{seed:016x}-{hashlib.blake2b(digest_of, digest_size=8).hexdigest()}"


class JobFailed(RuntimeError):
    """A job-level call (upload, create, download) that kept failing: the rows of that job get an error."""


class BatchJobs:
    """The Batch API side of a gemini backend: submit, record, re-attach, poll, fetch."""

    def __init__(self, backend: GeminiBackend):
        from vb_batch.io.filesystems import fsspec_filesystem

        self.backend = backend
        self.cfg = backend.cfg
        self.fs, self.root = fsspec_filesystem(self.cfg.state_url, self.cfg.state_storage)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] | None = None  # record file -> record
        self._results: dict[str, dict[str, np.ndarray | RowError]] = {}  # job name -> answers by key
        self._usage: dict[str, dict[str, int]] = {}  # key -> the tokens its answer was billed

    # ------------------------------------------------------------------ records

    def _record_path(self, record: dict[str, Any]) -> str:
        return f"{self.root.rstrip('/')}/gemini-{record['id']}.json"

    def _save(self, record: dict[str, Any]) -> None:
        from vb_batch.io.sinks import write_atomic

        write_atomic(self.fs, self._record_path(record), json.dumps(record).encode())

    def records(self) -> dict[str, dict[str, Any]]:
        """Every recorded job of this output (read once per process; unnamed ones looked up, `_find_created`)."""
        from vb_batch.io.sinks import read_json

        if self._records is None:
            records = {}
            paths = self.fs.glob(f"{self.root.rstrip('/')}/gemini-*.json") if self.fs.exists(self.root) else []
            for path in sorted(paths):
                record = read_json(self.fs, path)
                if record and record.get("id"):
                    records[record["id"]] = record
            # A lookup that fails fails the call (its rows get an error; a resume looks again): its rows
            # are not submitted again while their job may be running.
            self._find_created([r for r in records.values() if not r.get("name") and r.get("display_name")])
            self._records = records
        return self._records

    def _find_created(self, unnamed: list[dict[str, Any]]) -> None:
        """Name the recorded jobs whose run stopped between creating them and recording their names.

        Each job is created with the display name its record holds (unique to the run's call), so
        the service's list of batch jobs (`batches.list`, every page) says whether the create got
        through: a job found is re-attached to, not created again (and not paid for twice).
        """
        if not unnamed:
            return
        wanted = {record["display_name"]: record for record in unnamed}
        pager = self._call(lambda: self.backend.client().batches.list(config={"page_size": LIST_PAGE_SIZE}))
        for job in pager:  # the SDK's pager fetches the next pages as it goes
            record = wanted.pop(job.display_name or "", None)
            if record is None:
                continue
            record["name"], record["state"] = job.name, _text(job.state)
            self._save(record)
            log.info("gemini batch: found job %s, created for %s by a run that stopped before recording it; "
                     "re-attaching to it", job.name, record["display_name"])
            if not wanted:
                break

    def _attachable(self) -> dict[str, dict[str, Any]]:
        """Key -> the recorded job that has its answer coming (or come); failed jobs and failed keys are asked again."""
        found = {}
        for record in self.records().values():
            if not record.get("name"):
                log.warning("gemini batch: a run stopped between uploading %s and creating its job (no job named "
                            "%s was found); its rows are submitted again", record.get("file"), record.get("display_name"))
                continue
            if record.get("state") in FAILED_STATES:
                continue
            failed = set(record.get("failed_keys") or ())
            for key in record["keys"]:
                if key not in failed:
                    found[key] = record
        return found

    # ------------------------------------------------------------------ the run of one model call

    def answers(self, images, prompts, task, seeds) -> list[np.ndarray | RowError]:
        cancelled = self.backend.cancelled  # set when the model stage stops before this call ends
        lines = {}
        keys = []
        fits: dict[str, Fit] = {}
        for image, prompt, seed in zip(images, prompts, seeds):
            request, fits_row = self.backend.batch_request(image, prompt, seed)
            body = json.dumps(request, sort_keys=True)
            key = request_key(task, seed, f"{self.cfg.model_name}\n{body}".encode())
            keys.append(key)
            fits[key] = fits_row
            lines[key] = json.dumps({"key": key, "request": request}) + "\n"
        with self._lock:
            attachable = self._attachable()
        jobs: dict[str, dict[str, Any]] = {}
        fresh = []
        for key in dict.fromkeys(keys):
            record = attachable.get(key)
            if record is not None:
                jobs[record["id"]] = record
            else:
                fresh.append(key)
        if jobs:
            log.info("gemini batch: re-attaching to %d recorded job(s) for %d request(s)", len(jobs),
                     len(keys) - len(fresh))
        failed: dict[str, np.ndarray | RowError] = {}
        for chunk in self._split(fresh, lines):
            if cancelled.is_set():  # the run stopped: submit nothing more (its rows are dropped)
                failed.update({key: RowError("model_batch_failed", "gemini batch: the run stopped") for key in chunk})
                continue
            try:
                record = self._submit(chunk, lines)
            except JobFailed as exc:  # its rows fail with their job, not one by one
                failed.update({key: RowError("model_batch_failed", f"gemini batch: {exc}") for key in chunk})
                continue
            jobs[record["id"]] = record
        results = {**self._wait(list(jobs.values()), cancelled), **failed}
        missing = RowError("model_batch_failed", "gemini batch: the job's results hold no answer for this request")
        answers = []
        for key, seed in zip(keys, seeds):
            answer = results.get(key, missing)
            self.backend.record_usage(seed, self._usage.pop(key, None))  # billed, image or not
            if isinstance(answer, np.ndarray):
                answer = crop_answer(answer, fits[key])
            answers.append(answer)
        return answers

    def _split(self, keys: list[str], lines: dict[str, str]) -> list[list[str]]:
        """Keys in chunks within the API's limits: `model.batch_max_requests` lines, under 2 GB of JSONL."""
        chunks: list[list[str]] = []
        size = 0
        for key in keys:
            length = len(lines[key])
            if not chunks or len(chunks[-1]) >= self.cfg.batch_max_requests or size + length > BATCH_FILE_MAX_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(key)
            size += length
        return chunks

    def _submit(self, keys: list[str], lines: dict[str, str]) -> dict[str, Any]:
        """Upload one JSONL file and create its batch job; the job is recorded as soon as its name is known."""
        from google.genai import types

        client = self.backend.client()
        record = {"id": uuid.uuid4().hex[:16], "model": self.cfg.model_name, "keys": keys, "name": None,
                  "state": None, "created": time.time()}
        record["display_name"] = f"vb-{record['id']}"
        with tempfile.TemporaryFile() as jsonl:
            for key in keys:
                jsonl.write(lines[key].encode())
            jsonl.seek(0)
            uploaded = self._call(lambda: client.files.upload(
                file=jsonl, config=types.UploadFileConfig(mime_type="jsonl", display_name=record["display_name"])))
        record["file"] = uploaded.name
        # Recorded before the job is created: a run killed before its name is known finds the job by its
        # display name on resume (`_find_created`), or re-submits its rows when the create never got through.
        self._save(record)
        job = self._call(lambda: client.batches.create(
            model=self.cfg.model_name, src=types.BatchJobSource(file_name=uploaded.name),
            config=types.CreateBatchJobConfig(display_name=record["display_name"])))
        record["name"], record["state"] = job.name, _text(job.state)
        self._save(record)
        with self._lock:
            self.records()[record["id"]] = record
        log.info("gemini batch: job %s created for %d request(s) (%s)", job.name, len(keys), record["state"])
        return record

    def _call(self, call):
        """A job-level SDK call (upload, create, get, download), retried like a row's; a fault stops the batch."""
        result = with_retries(lambda: self.backend.limited(call), self.backend.classify, self.cfg, self.backend.shown)
        if isinstance(result, RowError):
            raise JobFailed(result.message)  # the job's rows get an error (its record, if any, is kept)
        return result

    def _wait(self, records: list[dict[str, Any]], cancelled: threading.Event) -> dict[str, np.ndarray | RowError]:
        """Poll the jobs until each is done (or `model.batch_timeout_s` passes, or the run stops); answers by key."""
        from tqdm.auto import tqdm

        results: dict[str, np.ndarray | RowError] = {}
        pending = {r["id"]: r for r in records}
        wait = self.cfg.batch_poll_s
        deadline = time.monotonic() + self.cfg.batch_timeout_s
        failing_since: dict[str, float] = {}  # job id -> when its polls started failing
        with tqdm(total=len(records), desc="gemini batch jobs", unit="job", disable=None, leave=False) as bar:
            while True:
                for job_id, record in list(pending.items()):
                    if record["name"] in self._results:
                        job_state = SUCCEEDED
                    else:
                        job = self._poll(record, failing_since)
                        if isinstance(job, RowError):  # the job's polls failed for batch_poll_retry_s
                            del pending[job_id]
                            results.update({key: job for key in record["keys"]})
                            continue
                        if job is None:  # this poll failed: the job is polled again later
                            continue
                        job_state = _text(job.state)
                    if job_state not in DONE_STATES:
                        continue
                    del pending[job_id]
                    bar.update(1)
                    try:
                        results.update(self._finish(record, job_state,
                                                    None if record["name"] in self._results else job))
                    except JobFailed as exc:  # its results could not be downloaded: a resume downloads them
                        why = f"gemini batch job {record['name']}: {exc}; resume (output.mode: resume) to fetch them"
                        results.update({key: RowError("model_batch_pending", why) for key in record["keys"]})
                if not pending:
                    return results
                if time.monotonic() >= deadline:
                    break
                bar.set_postfix_str(f"next poll in {wait:.0f} s")
                if cancelled.wait(min(wait, max(0.0, deadline - time.monotonic()))):
                    break
                wait = min(wait * 1.5, self.cfg.batch_poll_s * MAX_POLL_FACTOR)
        for record in pending.values():
            waited = "when the run stopped" if cancelled.is_set() else f"after {self.cfg.batch_timeout_s:.0f} s"
            why = (f"gemini batch job {record['name']} still running {waited}; resume the "
                   "run (output.mode: resume) to re-attach to it")
            results.update({key: RowError("model_batch_pending", why) for key in record["keys"]})
        return results

    def _poll(self, record: dict[str, Any], failing_since: dict[str, float]):
        """One poll of a job (one attempt: a stalled or failed poll is retried at the next poll, not per row).

        The job, None when this poll failed, or the RowError of all its rows once its polls have
        failed for `model.batch_poll_retry_s` (the job may still run: a resume re-attaches to it).
        """
        try:
            job = self.backend.limited(lambda: self.backend.client().batches.get(name=record["name"]))
        except Exception as exc:  # noqa: BLE001 - classified below; unknown ones re-raised
            failure = self.backend.classify(exc)
            if failure is None:
                raise
            since = failing_since.setdefault(record["id"], time.monotonic())
            if time.monotonic() - since >= self.cfg.batch_poll_retry_s:
                why = (f"gemini batch job {record['name']}: polls failed for {self.cfg.batch_poll_retry_s:.0f} s "
                       f"({failure.reason}); resume the run (output.mode: resume) to re-attach to it")
                log.warning("%s", why)
                return RowError("model_batch_pending", why)
            log.info("gemini batch job %s: poll failed (%s); polled again later", record["name"], failure.reason)
            return None
        failing_since.pop(record["id"], None)
        return job

    def _finish(self, record: dict[str, Any], job_state: str, job) -> dict[str, np.ndarray | RowError]:
        """A finished job's answers by key (downloaded once per process); its record updated."""
        name = record["name"]
        if job_state in FAILED_STATES:
            code = "model_batch_expired" if job_state == EXPIRED else "model_batch_failed"
            error = getattr(job, "error", None)
            detail = f": {self.backend._scrub(server_text(error.message))}" if error is not None and error.message else ""
            why = f"gemini batch job {name} ended {job_state.removeprefix('JOB_STATE_')}{detail}"
            log.warning("%s; its %d row(s) get an error", why, len(record["keys"]))
            answers: dict[str, np.ndarray | RowError] = {key: RowError(code, why) for key in record["keys"]}
        elif name in self._results:
            answers = self._results[name]
        else:
            answers = self._download(name, job)
            self._results[name] = answers
        failed = sorted(key for key, answer in answers.items() if isinstance(answer, RowError))
        if record.get("state") != job_state or record.get("failed_keys") != failed:
            record["state"], record["failed_keys"] = job_state, failed
            self._save(record)
        return answers

    def _download(self, name: str, job) -> dict[str, np.ndarray | RowError]:
        from google.genai import types

        dest = job.dest
        if dest is None or not dest.file_name:
            return {}  # every key then gets "no answer"
        data = self._call(lambda: self.backend.client().files.download(file=dest.file_name))
        answers: dict[str, np.ndarray | RowError] = {}
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
            except (ValueError, KeyError, TypeError):
                log.warning("gemini batch job %s: results line %d is not JSON with a key; skipped", name, number)
                continue
            if entry.get("error"):
                error = entry["error"] if isinstance(entry["error"], dict) else {"message": str(entry["error"])}
                why = f"gemini batch job {name}: the request failed: {error.get('code', '')} {error.get('message', '')}"
                answers[key] = RowError("model_batch_failed", self.backend._scrub(server_text(why)))
                continue
            try:
                response = types.GenerateContentResponse.model_validate_json(json.dumps(entry.get("response") or {}))
            except ValueError as exc:
                answers[key] = RowError("model_bad_answer", f"gemini batch job {name}: {server_text(str(exc))}")
                continue
            answer = read_answer(response)
            answers[key] = RowError(answer.code, self.backend._scrub(answer.message)) if isinstance(answer, RowError) \
                else answer
            usage = usage_of(response)
            if usage:
                self._usage[key] = usage
        return answers
