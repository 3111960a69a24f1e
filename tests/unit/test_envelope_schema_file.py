"""The envelope's schema, as published in the docs, is the one the code holds, and a valid JSON Schema."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema

import chatfeed
from chatfeed.bridge import ENVELOPE_SCHEMA, encode

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bridge"
SCHEMA_FILE = DOCS / "envelope.schema.json"
REGENERATE = (
    'python -c "import json; from chatfeed.bridge import ENVELOPE_SCHEMA; '
    "open('docs/bridge/envelope.schema.json', 'w').write(json.dumps(ENVELOPE_SCHEMA, indent=2) + '\\n')\""
)


def test_the_schema_file_is_the_code_s_schema() -> None:
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    assert text == json.dumps(ENVELOPE_SCHEMA, indent=2) + "\n", f"regenerate the file: {REGENERATE}"


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_envelopes_the_bridge_writes_fit_the_schema_file() -> None:
    validator = _validator()
    received = datetime(2026, 3, 14, 9, 26, 53, 589793, tzinfo=timezone.utc)
    frames = (
        '{"type":"new_message","payload":{"id":"m-981","chatId":"17","role":"assistant","content":"Hi",'
        '"status":"COMPLETED","createdAt":"2026-03-14T09:26:52.120Z"}}',
        '{"type":"new_chat","payload":{"id":"17","userId":"user-1","createdAt":"2026-03-14T09:20:00+01:00"}}',
        '{"type":"error","message":"rate limited"}',
        '{"type":"typing","chatId":"17"}',
    )
    for frame in frames:
        event = chatfeed.parse_server_message(frame)
        assert isinstance(
            event, (chatfeed.NewMessage, chatfeed.NewChat, chatfeed.ErrorMessage, chatfeed.UnknownMessage)
        )
        record = encode(event, "user-1", received=received)
        validator.validate(json.loads(record.data))


def test_the_example_documents_of_the_envelope_page_fit_the_schema() -> None:
    validator = _validator()
    page = (DOCS / "envelope.md").read_text(encoding="utf-8")
    examples = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", page, re.DOTALL)]
    envelopes = [example for example in examples if isinstance(example, dict) and "dedup" in example]
    assert len(envelopes) >= 3
    for envelope in envelopes:
        validator.validate(envelope)


def _validator() -> Any:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
