"""The views: a sync one and an async one, each tracking for the signed-in user."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path

from whisperr.django import get_client


def report(request: HttpRequest, name: str) -> JsonResponse:
    """A report was viewed: tracked for the request's user (nothing is sent when anonymous)."""
    message_id = request.whisperr.track("report_viewed", {"report": name})
    return JsonResponse({"user": request.whisperr.user_id, "message_id": message_id})


async def export(request: HttpRequest) -> JsonResponse:
    """An async view; code below the middleware tracks for the same user without the request."""
    tracker = get_client().current()  # the request's scope, bound by the middleware
    message_id = tracker.track("export_requested", {"format": request.GET.get("format", "csv")})
    return JsonResponse({"user": tracker.user_id, "message_id": message_id})


urlpatterns = [
    path("reports/<str:name>", report),
    path("export", export),
]
