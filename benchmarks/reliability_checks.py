"""The reliability suite's inputs and security rows (benchmarks/reliability.py runs them).

Inputs are fuzzed where they are parsed: every operation of the OpenAPI schema (schemathesis, positive
and negative cases) against the gateway app in process, whose engine runs the real preprocess stage
(validation and both tokenizers) and answers a tenth of a second of silence, so that generating is
not what the fuzzing waits for; the lyric and prompt tokenizers on arbitrary text (hypothesis); and
the upload route's parsing over HTTP, whatever its form fields (found in the schema), once the
gateway has POST /uploads. Every call must answer below 500, within HANG_S.

Security rows talk to the suite's real gateway over HTTP where that is what an attacker would do
(body bound, headers, CORS, paths, with raw request lines so that no client normalises `..`), and
to the app in process where the check needs to look inside (the API key comparison, a 500's text).
Path escapes are tried on every GET and DELETE route that takes a file name in its path, read from the
OpenAPI schema (`file_routes`: /download here, DELETE /uploads/{name} once uploads are merged).
"""

from __future__ import annotations

import hmac
import json
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis import strategies as st

from acestep_triton.checkpoint import find_lyric_vocab, validate_checkpoint
from acestep_triton.contract import OUTPUT_SAMPLE_RATE, STAGES, GenerationParams, GenerationResult, ParameterError
from gateway import GenerationEngine, Settings, create_app
from gateway.engine import Readiness
from gateway.errors import INTERNAL_ERROR_DETAIL, EngineRejected
from gateway.middleware import CONTENT_SECURITY_POLICY, SECURITY_HEADERS

HANG_S = 10.0  # a call slower than this counts as a hang
SECRET = "SECRET-7f3a /internal/path token=abc"
Check = Callable[[], tuple[bool | None, str]]
# (method, path template) where client-chosen names become paths; {name} is the attempt.
FILE_PARAMETER = re.compile(r"\{(filename|name)\}")  # a path parameter that names a file
SECRET_FILE_TEXT = "outside-the-outputs-directory"
ESCAPES = ["../{secret}", "..%2f{secret}", "%2e%2e%2f{secret}", "%2e%2e/{secret}", "..%5c{secret}",
           "%252e%252e%252f{secret}", "....//{secret}", "link.wav", "%2fetc%2fpasswd", ".jobs.sqlite3",
           "x%00.wav", "%c0%ae%c0%ae%2f{secret}"]
OUTPUT_PATH_ESCAPES = ["../escape.wav", "/tmp/escape.wav", "sub/escape.wav", ".hidden.wav", "escape.wav\x00.wav",
                       "..\\escape.wav", "%2e%2e%2fescape.wav"]


class PreprocessEngine(GenerationEngine):
    """The real preprocess stage in process (contract validation, prompt and lyric tokenizers), then
    0.1 s of silence per seed: the gateway end to end without the neural network."""

    def __init__(self, checkpoint: Path, lyric_vocab: str | None, failure: Exception | None = None) -> None:
        from acestep_triton.lyrics import LyricTokenizer
        from acestep_triton.text_tokenizer import TextTokenizer

        ckpt = validate_checkpoint(checkpoint)
        self.text = TextTokenizer.from_pretrained(ckpt.text_encoder)
        self.lyrics = LyricTokenizer.from_file(find_lyric_vocab(ckpt, lyric_vocab))
        self.failure = failure

    async def generate(self, params: GenerationParams, progress=None, source=None, stream_audio: bool = False,
                       request_id: str = "") -> GenerationResult:
        from acestep_triton.preprocess import prepare_request

        if self.failure is not None:
            raise self.failure
        try:
            prepared = prepare_request(params, self.text.tokenize_one, self.lyrics.tokenize)
        except ParameterError as error:
            raise EngineRejected(str(error)) from None
        silence = np.zeros((len(prepared.seeds), 2, OUTPUT_SAMPLE_RATE // 10), dtype=np.float32)
        return GenerationResult(silence, tuple(prepared.seeds), prepared.duration, {s: 0.0 for s in STAGES}, 0.0)

    async def ready(self) -> Readiness:
        return Readiness(True)


def in_process_app(checkpoint: Path, engine: GenerationEngine, **settings_values) -> TestClient:
    outputs = Path(tempfile.mkdtemp(prefix="acestep-fuzz-"))
    return TestClient(create_app(Settings(checkpoint_path=str(checkpoint), outputs_dir=outputs, **settings_values),
                                 engine), raise_server_exceptions=False)


def _settings(examples: int, quick: bool):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=quick,
                    suppress_health_check=list(HealthCheck))


# ---- inputs --------------------------------------------------------------------------------------------


def input_rows(checkpoint: Path, lyric_vocab: str | None, examples: int, quick: bool) -> Iterator[tuple[str, str, Check]]:
    yield ("inputs:openapi", "every operation of the OpenAPI schema (schemathesis, positive and negative)",
           lambda: fuzz_openapi(checkpoint, lyric_vocab, examples, quick))
    yield ("inputs:lyrics", "the lyric tokenizer on arbitrary text (hypothesis)",
           lambda: fuzz_lyrics(checkpoint, lyric_vocab, examples * 8, quick))
    yield ("inputs:prompt", "the prompt tokenizer on arbitrary text (hypothesis)",
           lambda: fuzz_prompt(checkpoint, examples * 8, quick))
    yield ("inputs:uploads", "upload parsing: POST /uploads with arbitrary files and names (hypothesis)",
           lambda: fuzz_uploads(checkpoint, lyric_vocab, examples, quick))


def _fuzz(strategy, check: Callable[[object], None], examples: int, quick: bool) -> tuple[str | None, float]:
    """`check` on `examples` values drawn from `strategy` (hypothesis; a failure is shrunk), each call
    within HANG_S: (the failure, or None; the slowest call's seconds). A strategy that cannot draw a
    value (a negative case of an operation without parameters) has nothing to fail."""
    slowest = 0.0

    @given(value=strategy)
    @_settings(examples, quick)
    def run(value) -> None:
        nonlocal slowest
        start = time.monotonic()
        check(value)
        seconds = time.monotonic() - start
        slowest = max(slowest, seconds)
        assert seconds < HANG_S, f"{seconds:.1f} s for {value!r}"

    try:
        run()
    except AssertionError as failure:
        return str(failure), slowest
    except Unsatisfiable:
        pass
    return None, slowest


def fuzz_openapi(checkpoint: Path, lyric_vocab: str | None, examples: int, quick: bool) -> tuple[bool, str]:
    import schemathesis
    from schemathesis import GenerationMode

    statuses: dict[int, int] = {}
    slowest = 0.0
    with in_process_app(checkpoint, PreprocessEngine(checkpoint, lyric_vocab)) as client:
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)

        def served(case):  # half the bodies name the served checkpoint, or nearly all would stop at it
            if isinstance(case.body, dict) and "checkpoint_path" in case.body and hash(json.dumps(
                    case.body, sort_keys=True, default=str)) % 2:
                case.body["checkpoint_path"] = str(checkpoint)
            return case

        def call(case) -> None:
            response = case.call(session=client)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"

        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failure, seconds = _fuzz(operation.as_strategy(generation_mode=mode).map(served), call, examples, quick)
                if failure:
                    return False, failure
                slowest = max(slowest, seconds)
    counts = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    return True, (f"{sum(statuses.values())} calls over {len(operations)} operations, no 5xx, slowest "
                  f"{slowest:.2f} s; statuses {counts}")


def _lyrics_text():
    line = st.one_of(st.text(max_size=80), st.sampled_from(["[verse]", "[chorus]", "[bridge]", "[outro]", ""]),
                     st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
    return st.lists(line, max_size=30).map("\n".join)


def fuzz_lyrics(checkpoint: Path, lyric_vocab: str | None, examples: int, quick: bool) -> tuple[bool, str]:
    from acestep_triton.lyrics import LyricTokenizer

    tokenizer = LyricTokenizer.from_file(find_lyric_vocab(validate_checkpoint(checkpoint), lyric_vocab))
    tokens = 0

    def tokenize(text: str) -> None:
        nonlocal tokens
        ids = tokenizer.tokenize(text)
        tokens += len(ids)
        assert ids[0] == tokenizer.start_id and all(0 <= i < tokenizer.vocab_size for i in ids), text

    failure, slowest = _fuzz(_lyrics_text(), tokenize, examples, quick)
    return not failure, failure or (f"{examples} texts, {tokens} ids, all in the vocabulary; slowest "
                                    f"{slowest * 1000:.0f} ms")


def fuzz_prompt(checkpoint: Path, examples: int, quick: bool) -> tuple[bool, str]:
    from acestep_triton.text_tokenizer import TEXT_MAX_TOKENS, TextTokenizer

    tokenizer = TextTokenizer.from_pretrained(validate_checkpoint(checkpoint).text_encoder)

    def tokenize(text: str) -> None:
        ids, mask = tokenizer.tokenize_one(text)
        assert len(ids) == len(mask) <= TEXT_MAX_TOKENS and all(i >= 0 for i in ids), text

    failure, slowest = _fuzz(st.text(max_size=4096), tokenize, examples, quick)
    return not failure, failure or (f"{examples} prompts, at most {TEXT_MAX_TOKENS} ids each; slowest "
                                    f"{slowest * 1000:.0f} ms")


def fuzz_uploads(checkpoint: Path, lyric_vocab: str | None, examples: int, quick: bool) -> tuple[bool | None, str]:
    """POST /uploads with arbitrary bytes, file names and media types in its binary form field (read from
    the schema): never a 5xx, never a hang. (Escapes through upload names: security:paths.)"""
    with in_process_app(checkpoint, PreprocessEngine(checkpoint, lyric_vocab)) as client:
        operation = client.app.openapi()["paths"].get("/uploads", {}).get("post")
        if operation is None:
            return None, ("skipped: this gateway has no POST /uploads (it comes with branch modes-gateway; "
                          "this row fuzzes it once merged, inputs:openapi too)")
        form = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        if "$ref" in form:
            form = client.app.openapi()["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
        field = next(name for name, spec in form["properties"].items() if spec.get("format") == "binary")
        statuses: dict[int, int] = {}

        def upload(file: tuple[str, bytes, str]) -> None:
            response = client.post("/uploads", files={field: file})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{file[0]!r} {file[2]}: {response.status_code} {response.text}"

        files = st.tuples(st.text(max_size=60), st.binary(max_size=4096), st.sampled_from(
            ["audio/wav", "audio/mpeg", "application/octet-stream", "text/plain", ""]))
        failure, slowest = _fuzz(files, upload, examples, quick)
    return not failure, failure or f"{sum(statuses.values())} uploads, no 5xx, slowest {slowest:.2f} s; {statuses}"


# ---- security ------------------------------------------------------------------------------------------


def raw_request(port: int, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request sent exactly as given: `target` unnormalised, `body` as framed by `headers`."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), answer_headers, payload


def chunked(body: bytes, size: int = 65536) -> bytes:
    """`body` in HTTP/1.1 chunked transfer coding."""
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def security_rows(suite) -> Iterator[tuple[str, str, Check]]:
    yield "security:body-limit", "request bodies over ACESTEP_MAX_BODY_BYTES", lambda: body_limit(suite)
    yield "security:api-key", "the API key compared in constant time", lambda: api_key(suite)
    yield "security:internal-text", "no internal text in a 500", lambda: internal_text(suite)
    yield "security:headers", "security headers on every answer", lambda: headers(suite)
    yield "security:cors", "CORS closed by default", lambda: cors(suite)
    yield "security:paths", "no way out of the outputs directory", lambda: paths(suite)


def body_limit(suite) -> tuple[bool, str]:
    """A body of 1.5 MiB: announced by Content-Length (refused from the headers alone: none of it is sent),
    and sent chunked (refused once 1 MiB arrived)."""
    big = json.dumps(suite.body(lyrics="la " * (1 << 19))).encode()
    jobs_before = len(suite.get("/jobs?limit=100").json()["jobs"])
    json_type = {"Content-Type": "application/json"}
    declared = raw_request(suite.gateway.port, "POST", "/generate", json_type | {"Content-Length": str(len(big))})
    sent = raw_request(suite.gateway.port, "POST", "/jobs", json_type | {"Transfer-Encoding": "chunked"}, chunked(big))
    jobs_after = len(suite.get("/jobs?limit=100").json()["jobs"])
    ok = declared[0] == 413 and sent[0] == 413 and jobs_after == jobs_before
    return ok, (f"{len(big) / 2**20:.1f} MiB announced by Content-Length: {declared[0]} "
                f"{json.loads(declared[2])['detail']!r} before any of it was sent; chunked: {sent[0]}; "
                f"jobs created: {jobs_after - jobs_before}")


def api_key(suite) -> tuple[bool, str]:
    compared = []
    real = hmac.compare_digest
    engine = PreprocessEngine(suite.checkpoint, suite.args.lyric_vocab)
    with mock.patch.object(hmac, "compare_digest", lambda a, b: compared.append(len(a)) or real(a, b)), \
            in_process_app(suite.checkpoint, engine, api_key="k3y-for-the-suite") as client:
        wrong = client.post("/generate", json=suite.body(), headers={"X-API-Key": "guess"}).status_code
        bearer = client.post("/generate", json=suite.body(), headers={"Authorization": "Bearer k3y-for-the-suite"})
        missing = client.post("/generate", json=suite.body()).status_code
    ok = wrong == 401 and bearer.status_code == 200 and missing == 401 and len(compared) == 2
    return ok, (f"wrong key {wrong}, missing {missing}, right key (Bearer) {bearer.status_code}; "
                f"hmac.compare_digest made {len(compared)} of the 2 comparisons")


def internal_text(suite) -> tuple[bool, str]:
    engine = PreprocessEngine(suite.checkpoint, suite.args.lyric_vocab, failure=RuntimeError(SECRET))
    with in_process_app(suite.checkpoint, engine) as client:
        response = client.post("/generate", json=suite.body())
    leaked = "SECRET" in response.text or any("SECRET" in v for v in response.headers.values())
    ok = response.status_code == 500 and response.json() == {"detail": INTERNAL_ERROR_DETAIL} and not leaked
    return ok, f"an engine raising {SECRET!r}: {response.status_code} {response.json()}"


def headers(suite) -> tuple[bool, str]:
    answers = {"/health": suite.get("/health"), "/nowhere": suite.get("/nowhere"),
               "/generate {}": suite.post("/generate", {}), "/download (404)": suite.get("/download/none.wav")}
    wanted = {k.decode(): v.decode() for k, v in SECURITY_HEADERS.items()}
    wanted["content-security-policy"] = CONTENT_SECURITY_POLICY.decode()
    missing = {path: [k for k, v in wanted.items() if r.headers.get(k) != v] for path, r in answers.items()}
    missing = {path: names for path, names in missing.items() if names}
    return not missing, (f"{', '.join(sorted(wanted))} on {', '.join(answers)}" if not missing
                         else f"missing: {missing}")


def cors(suite) -> tuple[bool, str]:
    preflight = raw_request(suite.gateway.port, "OPTIONS", "/generate", {
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    simple = raw_request(suite.gateway.port, "GET", "/health", {"Origin": "https://elsewhere.example"})
    allowed = [h for h in (preflight[1], simple[1]) if "access-control-allow-origin" in h]
    return not allowed, (f"preflight from another origin: {preflight[0]}, no Access-Control-Allow-Origin on it "
                         f"or on a GET: {not allowed}")


def file_routes(suite) -> list[tuple[str, str]]:
    """(method, path with `{name}`) of every GET or DELETE operation of the gateway's OpenAPI schema that
    takes a file name in its path: /download/{filename} here, /uploads/{name} where uploads exist."""
    paths = suite.get("/openapi.json").json()["paths"]
    return [(method.upper(), FILE_PARAMETER.sub("{name}", path)) for path, operations in paths.items()
            if FILE_PARAMETER.search(path) for method in operations if method in ("get", "delete")]


def paths(suite) -> tuple[bool, str]:
    """Escapes through every file route (a symlink placed in the outputs directory pointing outside
    included), then escaping output_path values; the file outside must be neither read nor removed."""
    secret = suite.work / "outside-secret.txt"
    secret.write_text(SECRET_FILE_TEXT)
    link = suite.outputs / "link.wav"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    relative = Path("..") / secret.name
    routes = file_routes(suite)
    leaks, statuses = [], {}
    try:
        for method, template in routes:
            for attempt in ESCAPES:
                target = template.format(name=attempt.format(secret=relative))
                status, _, body = raw_request(suite.gateway.port, method, target)
                statuses[status] = statuses.get(status, 0) + 1
                if SECRET_FILE_TEXT.encode() in body or b"root:" in body or b"SQLite" in body:
                    leaks.append(f"{method} {target}")
        refused = []
        for name in OUTPUT_PATH_ESCAPES:
            response = suite.post("/generate", suite.body(output_path=name))
            refused.append(response.status_code == 400 and response.json()["detail"].startswith("output_path"))
        escaped = [p for p in (suite.work / "escape.wav", Path("/tmp/escape.wav")) if p.exists()]
        intact = secret.read_text() == SECRET_FILE_TEXT
    finally:
        link.unlink(missing_ok=True)
    ok = not leaks and all(s in (400, 404) for s in statuses) and all(refused) and not escaped and intact
    return ok, (f"{sum(statuses.values())} escapes on {', '.join(f'{m} {t}' for m, t in routes)}: statuses "
                f"{statuses}, leaked: {leaks or 'nothing'}, the file outside intact: {intact}; {sum(refused)}/"
                f"{len(refused)} escaping output_path refused (400 naming it), written outside: {escaped or 'nothing'}")
