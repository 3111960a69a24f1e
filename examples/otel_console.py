"""OpenTelemetry: a client's metrics and a span per handler call, printed to the console.

Configures the OpenTelemetry SDK with console exporters, gives a client an
``OpenTelemetryObserver``, pushes a chat and three messages from its own
FeedServer, exports the metrics once while the client is still open, and
exits. Standard output holds the spans, then the metrics, as JSON: each
handler call is a ``process new_message`` span, and the span its handler
opens (``summarise``) is its child.

Needs the SDK besides the extra: ``pip install 'chatfeed[otel]'
opentelemetry-sdk``. Run it with ``python examples/otel_console.py``.
"""

from __future__ import annotations

import asyncio
import math
import sys

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import chatfeed
from chatfeed.otel import OpenTelemetryObserver
from chatfeed.testing import FeedServer

TOKEN = "dev-token"
MESSAGES = 3

tracer = trace.get_tracer("otel_console")


def configure_opentelemetry() -> MeterProvider:
    """Set the global meter and tracer providers, as an application does once at start-up."""
    resource = Resource.create({"service.name": "otel-console-example"})
    # In production: an OTLP exporter, every 60 s (the default interval), and
    # a BatchSpanProcessor. Here, metrics are exported when flushed, spans at once.
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=math.inf)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    metrics.set_meter_provider(meter_provider)
    trace.set_tracer_provider(tracer_provider)
    return meter_provider


async def main() -> int:
    meter_provider = configure_opentelemetry()
    handled = 0
    all_handled = asyncio.Event()

    async with FeedServer(tokens=[TOKEN]) as server:
        # No provider given: the global ones, configured above.
        client = chatfeed.Client(server.url, token=TOKEN, observer=OpenTelemetryObserver())

        @client.on("new_message")
        async def summarise(event: chatfeed.NewMessage) -> None:
            nonlocal handled
            # A child of the handler call's "process new_message" span.
            with tracer.start_as_current_span("summarise") as span:
                span.set_attribute("summary.words", len(event.payload.content.split()))
                await asyncio.sleep(0.01)  # stands for a call to a model
            handled += 1
            if handled == MESSAGES:
                all_handled.set()

        async with client:
            chat = await server.push_chat(title="Tomatoes on a balcony")
            for content in ["Which variety?", "A cherry tomato.", "How often should I water it?"]:
                await server.push_message(chat_id=chat.id, content=content)
            await asyncio.wait_for(all_handled.wait(), timeout=10)
            meter_provider.force_flush()  # while the client is open: "open" in the feeds by state
    # Off the loop: shutdown() blocks, and its last collection, on the reader's
    # thread, reads what is still open on this loop. (Or call it after asyncio.run.)
    await asyncio.to_thread(meter_provider.shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
