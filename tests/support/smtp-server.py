#!/usr/bin/env python3
"""A real SMTP server (aiosmtpd) on loopback for the announcement tests.

Usage: smtp-server.py PORT CERT KEY USER PASSWORD

Offers STARTTLS with CERT/KEY and requires it, and AUTH (PLAIN/LOGIN) with USER/PASSWORD,
before it takes mail. Prints "ready" once it listens, then one JSON line per message received
({"from", "to", "data"}), and runs until its standard input closes or it is killed.
"""
import json
import logging
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Keep:
    async def handle_DATA(self, server, session, envelope):
        line = {
            "from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "data": envelope.content.decode("utf-8", "replace"),
            "tls": session.ssl is not None,
            "login": session.authenticated,
        }
        print(json.dumps(line), flush=True)
        return "250 OK"


def main():
    # aiosmtpd itself still sets the deprecated Session.login_data after a login, and logs it.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    port, cert, key, user, password = sys.argv[1:6]

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        return AuthResult(success=ok)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    controller = Controller(
        Keep(),
        hostname="127.0.0.1",
        port=int(port),
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=True,
    )
    controller.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
