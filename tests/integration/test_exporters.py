"""What chatfeed.otel and chatfeed.prometheus both report, and must mean alike."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatfeed.otel import OpenTelemetryObserver
from chatfeed.prometheus import PrometheusObserver
from chatfeed.testing import FeedServer

from ..conftest import OTHER_TOKEN, TOKEN
from .conftest import WAIT, Recorder
from .test_pool import make_pool

pytestmark = pytest.mark.timeout(20)

QUIET = 0.3
"""Seconds the quiet feed stays quiet (in production: a user's quiet hour)."""


def otel_ages(reader: InMemoryMetricReader) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "chatfeed.feed.last_event.age"
        for point in metric.data.data_points
    ]


async def test_the_one_age_of_both_exporters_is_the_freshest_feeds() -> None:
    # "Do events still arrive at all": one quiet feed of a busy pool is no outage. The per-feed
    # series answer "which feed is quiet".
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    otel = OpenTelemetryObserver(meter_provider=provider)
    prometheus = PrometheusObserver(per_feed=False)
    try:
        async with FeedServer(users={TOKEN: "busy", OTHER_TOKEN: "quiet"}) as server:
            pool = make_pool(server.url, observer=[otel, prometheus])
            pool.add("busy", token=TOKEN)
            pool.add("quiet", token=OTHER_TOKEN)
            received = Recorder()
            pool.on("new_chat")(lambda event, feed: received(feed))
            async with pool:
                await server.wait_for_clients(2, timeout=WAIT)
                await server.push_chat(user_id="quiet")
                await received.wait_for(1)
                await asyncio.sleep(QUIET)  # the time measured, not a wait for something to happen
                await server.push_chat(user_id="busy")
                await received.wait_for(2)
                prometheus_age = prometheus.registry.get_sample_value("chatfeed_last_event_age_seconds")
                [otel_age] = otel_ages(reader)
        assert received.events == ["quiet", "busy"]
        assert prometheus_age is not None and prometheus_age < QUIET
        assert not otel_age.attributes
        assert otel_age.value < QUIET
    finally:
        provider.shutdown()
