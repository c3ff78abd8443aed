"""The scopes a token must carry, by provider, grant and what it is for: SMTP (XOAUTH2),
Microsoft Graph or the Gmail API (servers.NAME.protocol). `scopes` in
[oauth_clients.NAME] replaces them."""

from __future__ import annotations

GOOGLE_MAIL = "https://mail.google.com/"  # SMTP (XOAUTH2)
GMAIL_SEND = "https://www.googleapis.com/auth/gmail.send"  # the Gmail API
MICROSOFT_SCOPES = ["https://outlook.office.com/SMTP.Send", "offline_access"]
MICROSOFT_APP_SCOPES = ["https://outlook.office365.com/.default"]  # SMTP.SendAsApp
GRAPH_SCOPES = ["https://graph.microsoft.com/Mail.Send", "offline_access"]
GRAPH_APP_SCOPES = ["https://graph.microsoft.com/.default"]  # Mail.Send (application)


def default_scopes(provider: str, grant: str, protocol: str = "smtp") -> list[str]:
    """What the relay asks for when `scopes` is not set, by provider, grant and what the
    token is for: "smtp" (XOAUTH2), "graph" or "gmail_api" (servers.NAME.protocol)."""
    # a generic provider (another authorization server) gets the API's scopes too
    if provider == "google" or (provider == "generic" and protocol == "gmail_api"):
        mail = GMAIL_SEND if protocol == "gmail_api" else GOOGLE_MAIL
        # a person's sign-in also asks who signed in, to refuse the wrong account
        return [mail, "openid", "email"] if grant == "authorization_code" else [mail]
    if provider == "microsoft" or (provider == "generic" and protocol == "graph"):
        if grant == "client_credentials":
            return list(GRAPH_APP_SCOPES if protocol == "graph" else MICROSOFT_APP_SCOPES)
        return list(GRAPH_SCOPES if protocol == "graph" else MICROSOFT_SCOPES)
    return []
