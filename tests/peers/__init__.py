"""Real mail servers (Postfix, Dovecot, Cyrus SASL) as integration-test peers, with the
OAuth 2.0 authorization server (tests/oauth_server.py) that Dovecot checks tokens with.

Private instances on 127.0.0.1, on free ports, with all state in a temporary
directory; see :mod:`tests.peers.fixtures` for the pytest fixtures and
:class:`tests.peers.peers.MailPeers` for what a test gets.
"""
