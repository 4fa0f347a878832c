"""Loopback servers that speak the hosted APIs' documented REST shapes, for the real SDKs to call.

GeminiServer (google-genai with `HttpOptions(base_url=...)`):
    (the API version in the paths is the one the SDK picks: v1beta or v1)
    POST /v1beta/models/{model}:generateContent         one answer
    POST /upload/v1beta/files                           resumable upload, start (X-Goog-Upload-Command: start)
    POST /upload/v1beta/files?upload_id=...             upload, finalize -> {"file": {...}}
    POST /v1beta/models/{model}:batchGenerateContent    create a batch (an Operation naming batches/{id})
    GET  /v1beta/batches?pageSize=&pageToken=           batches.list: {"operations": [...], "nextPageToken"}
    GET  /v1beta/batches/{id}                           the batch, its state and responsesFile when done
    POST /v1beta/batches/{id}:cancel
    GET  /v1beta/files/{id}:download?alt=media          a results file (also under /download/...)
OpenAIServer (openai with `base_url=...`):
    POST /v1/images/edits                               multipart: image, prompt, model, n, options

Both paint like an identity model (the answer is the image sent, so codec paintings decode
back to the maps they encode) unless a test scripts them: statuses with error bodies, text-only
or blocked answers, answers at another size, batches held RUNNING, failed or expired.

At scale (tests/test_hosted_scale.py) the Gemini server also: keeps each batch RUNNING for
`job_seconds` after its creation (and records when each ran), refuses requests over the
documented 20 MB inline limit (`inline_limit`) with Google's 400, stalls the first
`stall_polls` polls of a batch for `stall_s`, answers 429 RESOURCE_EXHAUSTED with a
per-day QuotaFailure once `daily_quota` requests were served, reports `usageMetadata` as
the service counts it (258 tokens per 768-px tile of the input image, 1290 an answer
image), and with `ratios` answers only in those aspect ratios, at their sizes, as a model
does: the scene kept undistorted (centre-cropped to the ratio), never stretched. With
`create_answer_gate` a batch is created at once but its creator hears of it only when the
gate opens (a client killed in between has a job it never learnt the name of); batches.list
sends at most `list_page_max` batches a page, as a service may.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def image_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose handler calls `self.handle(request)`."""

    def __init__(self):
        self.lock = threading.RLock()  # batches run (and answer) while it is held
        self.paths: list[str] = []
        self.headers_seen: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer.lock:
                    outer.paths.append(f"{self.command} {self.path}")
                    outer.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                status, headers, answer = outer.handle(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                try:
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def handle(self, method, path, headers, body) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


def _json(status: int, payload, headers: dict[str, str] | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(payload).encode()


def google_error(code: int, status: str, message: str, retry_delay: str | None = None):
    details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}] if retry_delay else []
    return _json(code, {"error": {"code": code, "message": message, "status": status, "details": details}})


def image_response(image: np.ndarray, text: str | None = None, finish: str = "STOP") -> dict:
    parts = ([{"text": text}] if text else []) + [
        {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png(image)).decode()}}]
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 1290}}


def gemini_image_tokens(width: int, height: int) -> int:
    """Gemini 2.x's count for an input image: 258 up to 384 px a side, else 258 per 768x768 tile."""
    if max(width, height) <= 384:
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


def cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The image centre-cropped to width:height and resized (nearest) to width x height: a model's fixed-ratio answer."""
    h, w = image.shape[:2]
    if w * height > h * width:  # too wide: crop the sides
        keep = round(h * width / height)
        image = image[:, (w - keep) // 2:(w - keep) // 2 + keep]
    else:
        keep = round(w * height / width)
        image = image[(h - keep) // 2:(h - keep) // 2 + keep]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.NEAREST))


def text_response(text: str, finish: str = "STOP") -> dict:
    return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish}]}


class GeminiServer(_Server):
    """A Gemini API: generateContent, the File API and the Batch API, checking the API key on every call."""

    def __init__(self, api_key: str):
        super().__init__()
        self.api_key = api_key
        self.script: list = []  # (status, body, headers) answers to the next generateContent calls
        # What a request gets: (image, prompt, request JSON) -> GenerateContentResponse JSON or ("error", code, msg).
        self.paint = lambda image, prompt, request: image_response(image)
        self.requests: list[dict] = []  # generateContent bodies
        self.request_times: list[float] = []  # when each generateContent arrived (time.monotonic)
        self.files: dict[str, bytes] = {}
        self.uploads: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.batch_creations = 0
        self.hold = False  # batches stay RUNNING until `release()`
        self.outcome = "BATCH_STATE_SUCCEEDED"  # or BATCH_STATE_FAILED / BATCH_STATE_EXPIRED
        self.echo_key_in_errors = False
        self.job_seconds = 0.0  # a batch stays RUNNING this long after its creation
        self.inline_limit: int | None = None  # the largest request body taken (Gemini's: 20 MB)
        self.largest_request = 0  # bytes of the largest generateContent body or batch line seen
        self.stall_polls = 0  # the next polls of batches that hang for `stall_s` before answering
        self.stall_s = 0.0
        self.polls = 0
        self.daily_quota: int | None = None  # requests served before 429 "per day" (None: no limit)
        self.served = 0
        self.ratios: dict[str, tuple[int, int]] | None = None  # aspect -> (width, height) answered
        self.thought_tokens = 0
        self.answered_ratios: list[str] = []
        self.sent_sizes: list[tuple[int, int]] = []  # (height, width) of every image received
        self.create_answer_gate: threading.Event | None = None  # a create's answer waits until it is set
        self.list_page_max = 50  # most batches on one page of batches.list (a service may send fewer than asked)

    def release(self):
        with self.lock:
            self.hold = False

    def handle(self, method, path, headers, body):
        parts = urlsplit(path)
        # /{v1beta|v1}/..., /upload/{version}/files, /download/{version}/files/...: the SDK picks the version.
        match = re.match(r"^/(upload/|download/)?v1(?:beta|alpha)?/(.*)$", parts.path)
        if match is None:
            return google_error(404, "NOT_FOUND", f"no route {method} {parts.path}")
        upload, route = match.group(1) == "upload/", match.group(2)
        # The upload URL a start answers with is itself the credential of its upload (as Google's is).
        if headers.get("x-goog-api-key") != self.api_key and "upload_id" not in parts.query:
            said = f" (got {headers.get('x-goog-api-key')})" if self.echo_key_in_errors else ""
            return google_error(403, "PERMISSION_DENIED", f"API key not valid{said}")
        if method == "POST" and route.endswith(":generateContent"):
            if self.inline_limit is not None and len(body) > self.inline_limit:
                return google_error(400, "INVALID_ARGUMENT", "Request payload size exceeds the limit: "
                                    f"{self.inline_limit} bytes.")
            with self.lock:
                self.largest_request = max(self.largest_request, len(body))
            if self.daily_quota is not None:
                with self.lock:
                    self.served += 1
                    over = self.served > self.daily_quota
                if over:
                    return quota_error()
            return self._generate(json.loads(body))
        if method == "POST" and upload and route == "files":
            return self._upload(parts.query, headers, body)
        if method == "POST" and route.endswith(":batchGenerateContent"):
            return self._create_batch(route, json.loads(body))
        if method == "GET" and route == "batches":
            return self._list_batches(parse_qs(parts.query))
        if route.startswith("batches/"):
            name = route.removesuffix(":cancel")
            if name not in self.batches:
                return google_error(404, "NOT_FOUND", f"{name} not found")
            if route.endswith(":cancel"):
                self.batches[name]["state"] = "BATCH_STATE_CANCELLED"
                return _json(200, {})
            with self.lock:
                self.polls += 1
                stall = self.stall_polls > 0
                self.stall_polls -= stall
            if stall:
                time.sleep(self.stall_s)  # the client's timeout ends this poll first
            return _json(200, self._batch_json(name))
        if method == "GET" and route.startswith("files/") and route.endswith(":download"):
            name = route.removesuffix(":download")
            if name not in self.files:
                return google_error(404, "NOT_FOUND", f"{name} not found")
            return 200, {"Content-Type": "application/octet-stream"}, self.files[name]
        return google_error(404, "NOT_FOUND", f"no route {method} {parts.path}")

    # ------------------------------------------------------------------ generateContent

    def answer(self, request: dict) -> dict | tuple:
        """What one GenerateContentRequest gets (online and in a batch)."""
        parts = request["contents"][0]["parts"]
        prompt = " ".join(p["text"] for p in parts if "text" in p)
        data = next(p["inlineData"]["data"] for p in parts if "inlineData" in p)
        # The SDK sends URL-safe base64 without padding; a JSONL file may carry the standard alphabet.
        data = data.replace("-", "+").replace("_", "/")
        image = image_of(base64.b64decode(data + "=" * (-len(data) % 4)))
        with self.lock:
            self.sent_sizes.append(image.shape[:2])
        if self.ratios:
            asked = (request.get("generationConfig") or {}).get("imageConfig", {}).get("aspectRatio")
            if asked not in self.ratios:  # the model's default: the ratio nearest the input's
                asked = min(self.ratios, key=lambda r: abs(math.log(self.ratios[r][0] / self.ratios[r][1])
                                                           - math.log(image.shape[1] / image.shape[0])))
            self.answered_ratios.append(asked)
            answer = self.paint(cover(image, *self.ratios[asked]), prompt, request)
        else:
            answer = self.paint(image, prompt, request)
        if isinstance(answer, dict) and answer.get("candidates"):
            answer = {**answer, "usageMetadata": {
                "promptTokenCount": gemini_image_tokens(image.shape[1], image.shape[0]) + math.ceil(len(prompt) / 4),
                "candidatesTokenCount": 1290, "thoughtsTokenCount": self.thought_tokens,
                "totalTokenCount": 0}}
        return answer

    def _generate(self, request):
        with self.lock:
            self.requests.append(request)
            self.request_times.append(time.monotonic())
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return scripted
        answer = self.answer(request)
        if isinstance(answer, tuple):
            return google_error(answer[1], "INTERNAL", answer[2])
        return _json(200, answer)

    # ------------------------------------------------------------------ files

    def _upload(self, query, headers, body):
        command = headers.get("X-Goog-Upload-Command", "")
        if command == "start":
            upload_id = uuid.uuid4().hex
            meta = json.loads(body or b"{}").get("file", {})
            self.uploads[upload_id] = {"meta": meta, "data": b""}
            return 200, {"X-Goog-Upload-URL": f"{self.url}/upload/v1beta/files?upload_id={upload_id}",
                         "X-Goog-Upload-Status": "active", "Content-Type": "application/json"}, b"{}"
        upload_id = parse_qs(query)["upload_id"][0]
        upload = self.uploads[upload_id]
        if int(headers.get("X-Goog-Upload-Offset", "0")) != len(upload["data"]):
            return google_error(400, "INVALID_ARGUMENT", "bad offset")
        upload["data"] += body
        if "finalize" not in command:
            return 200, {"X-Goog-Upload-Status": "active"}, b""
        name = f"files/{uuid.uuid4().hex[:12]}"
        self.files[name] = upload["data"]
        file = {"name": name, "displayName": upload["meta"].get("displayName", ""), "mimeType": "jsonl",
                "sizeBytes": str(len(upload["data"])), "state": "ACTIVE", "uri": f"{self.url}/v1beta/{name}"}
        return 200, {"X-Goog-Upload-Status": "final", "Content-Type": "application/json"}, \
            json.dumps({"file": file}).encode()

    # ------------------------------------------------------------------ batches

    def _create_batch(self, route, body):
        batch = body["batch"]
        source = batch["inputConfig"]["fileName"]
        if source not in self.files:
            return google_error(400, "INVALID_ARGUMENT", f"{source} not found")
        name = f"batches/{uuid.uuid4().hex[:12]}"
        with self.lock:
            self.batch_creations += 1
            self.batches[name] = {"model": route.removesuffix(":batchGenerateContent"),
                                  "displayName": batch.get("displayName", ""), "source": source,
                                  "state": "BATCH_STATE_PENDING", "created": time.monotonic(), "ended": None}
        if self.create_answer_gate is not None:  # the job exists; its creator hears of it once the gate opens
            self.create_answer_gate.wait(timeout=30)
        return _json(200, self._batch_json(name))

    def _list_batches(self, query):
        """batches.list: the batches as Operations, newest last, a page at a time (pageSize, pageToken)."""
        with self.lock:
            names = list(self.batches)
        size = min(int(query.get("pageSize", ["50"])[0]), self.list_page_max)
        start = int(query.get("pageToken", ["0"])[0])
        page = {"operations": [self._batch_json(name) for name in names[start:start + size]]}
        if start + size < len(names):
            page["nextPageToken"] = str(start + size)
        return _json(200, page)

    def _batch_json(self, name):
        batch = self.batches[name]
        with self.lock:
            due = time.monotonic() - batch["created"] >= self.job_seconds
            if batch["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING") and not self.hold and due:
                self._run_batch(name, batch)
                batch["ended"] = time.monotonic()
            elif batch["state"] == "BATCH_STATE_PENDING":
                batch["state"] = "BATCH_STATE_RUNNING"
        metadata = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                    "name": name, "displayName": batch["displayName"], "model": batch["model"],
                    "state": batch["state"], "createTime": "2026-12-03T00:00:00Z"}
        if "output" in batch:
            metadata["output"] = {"responsesFile": batch["output"]}
        done = batch["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
        return {"name": name, "metadata": metadata, "done": done}

    def _run_batch(self, name, batch):
        batch["state"] = self.outcome
        if self.outcome != "BATCH_STATE_SUCCEEDED":
            return
        lines = []
        for line in self.files[batch["source"]].decode().splitlines():
            entry = json.loads(line)
            self.largest_request = max(self.largest_request, len(line))
            if self.inline_limit is not None and len(line) > self.inline_limit:
                lines.append({"key": entry["key"], "error": {"code": 400, "message": "Request payload size "
                                                                                      "exceeds the limit"}})
                continue
            answer = self.answer(entry["request"])
            if isinstance(answer, tuple):
                lines.append({"key": entry["key"], "error": {"code": answer[1], "message": answer[2]}})
            else:
                lines.append({"key": entry["key"], "response": answer})
        output = f"files/batch-{uuid.uuid4().hex[:12]}"
        self.files[output] = "".join(json.dumps(line) + "\n" for line in lines).encode()
        batch["output"] = output


def quota_error():
    """Google's 429 when a per-day quota is gone (a QuotaFailure naming it, and a RetryInfo as the service sends)."""
    violation = {"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                 "quotaId": "GenerateRequestsPerDayPerProjectPerModel", "quotaDimensions": {"location": "global"}}
    return _json(429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                 "message": "You exceeded your current quota, please check your plan and billing details.",
                                 "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                                              "violations": [violation]},
                                             {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}})


class OpenAIServer(_Server):
    """The OpenAI images API's edit endpoint (multipart), checking the bearer key."""

    def __init__(self, api_key: str):
        super().__init__()
        self.api_key = api_key
        self.script: list = []  # (status, body, headers) answers to the next calls
        self.paint = lambda image, form: {"b64_json": base64.b64encode(png(image)).decode()}
        self.forms: list[dict] = []
        self.fixed_sizes = False  # answer at the size asked (scene centre-cropped to it), as gpt-image-1 does

    def handle(self, method, path, headers, body):
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                         "code": "invalid_api_key"}})
        if method != "POST" or urlsplit(path).path != "/v1/images/edits":
            return _json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
        form, image = {}, None
        for part in message.iter_parts():
            field = part.get_param("name", header="content-disposition")
            if field in ("image", "image[]"):
                image = image_of(part.get_payload(decode=True))
            else:
                form[field] = part.get_content()
        with self.lock:
            self.forms.append(form)
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return scripted
        if self.fixed_sizes and form.get("size") in ("1024x1024", "1536x1024", "1024x1536"):  # as gpt-image-1
            image = cover(image, *map(int, form["size"].split("x")))
        usage = {"input_tokens": 850, "input_tokens_details": {"image_tokens": 765, "text_tokens": 85},
                 "output_tokens": 4160, "total_tokens": 5010}
        return _json(200, {"created": 1764720000, "data": [self.paint(image, form)], "usage": usage})


def start_job_process(config: dict, folder: Path) -> subprocess.Popen:
    """`vb_batch.annotate(config)` in a child process (to kill -9 mid-run), the tests folder importable, output
    and errors on its stdout."""
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(config))
    return subprocess.Popen(
        [sys.executable, "-c", "import json, sys, vb_batch; vb_batch.annotate(json.load(open(sys.argv[1])))",
         str(job_path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
