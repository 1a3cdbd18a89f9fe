"""The event names the Whisperr spec reserves for membership billing.

Send them with ``track()`` from your backend when Whisperr has no billing source for your app
(no RevenueCat or Stripe connection, say), never from a front end; see the official SDK's
documentation for the properties each takes. The server stores them once the app has
registered them. The same names as the official SDK's ``whisperr.BillingEvent``.
"""

from __future__ import annotations

from typing import Final, final

__all__ = ["BillingEvent"]


@final
class BillingEvent:
    """Reserved billing event names, as plain strings (``BillingEvent.TRIAL_STARTED``)."""

    TRIAL_STARTED: Final = "trial_started"
    TRIAL_CONVERTED: Final = "trial_converted"
    TRIAL_AUTO_RENEW_DISABLED: Final = "trial_auto_renew_disabled"
    MEMBERSHIP_STARTED: Final = "membership_started"
    RENEWAL_SUCCEEDED: Final = "renewal_succeeded"
    AUTO_RENEW_DISABLED: Final = "auto_renew_disabled"
    AUTO_RENEW_ENABLED: Final = "auto_renew_enabled"
    MEMBERSHIP_ENDED: Final = "membership_ended"
    BILLING_ISSUE_STARTED: Final = "billing_issue_started"
    BILLING_RECOVERED: Final = "billing_recovered"
    REFUND_GRANTED: Final = "refund_granted"
