#!/usr/bin/env python3
"""A Web Push service and a webhook bridge for natrix's tests, written with
implementations nobody on the project wrote: `http_ece` decrypts RFC 8291
aes128gcm messages, `cryptography` checks the RFC 8292 VAPID signature.

It makes a user agent's P-256 key pair and auth secret, prints
{"port", "p256dh", "auth"} on its first output line, then serves:
  POST /push/<id>  a Web Push message: verified, decrypted, answered 201
  POST /gone/<id>  answered 410 (an expired subscription)
  POST /hook       a webhook: X-Natrix-Signature checked against $HOOK_SECRET
Every request becomes one JSON line in the file named by argv[1].
"""
import base64, hashlib, hmac, http.server, json, os, sys, threading

import http_ece
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.exceptions import InvalidSignature

OUT = sys.argv[1]
HOOK_SECRET = os.environ.get("HOOK_SECRET", "").encode()
LOCK = threading.Lock()

ua_key = ec.generate_private_key(ec.SECP256R1())
ua_public = ua_key.public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
auth_secret = os.urandom(16)


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def vapid_ok(header, host):
    try:
        fields = dict(p.strip().split("=", 1) for p in header[len("vapid "):].split(","))
        t, k = fields["t"], fields["k"]
        h, c, s = t.split(".")
        claims = json.loads(b64d(c))
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64d(k))
        raw = b64d(s)
        der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
        return json.loads(b64d(h))["alg"] == "ES256" and claims["aud"] == f"http://{host}"
    except (KeyError, ValueError, InvalidSignature):
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        record = {"path": self.path}
        status = 201
        if self.path.startswith("/push/"):
            record["encoding"] = self.headers.get("Content-Encoding")
            record["ttl"] = self.headers.get("TTL")
            record["topic"] = self.headers.get("Topic")
            record["urgency"] = self.headers.get("Urgency")
            record["vapid_ok"] = vapid_ok(self.headers.get("Authorization", ""), self.headers.get("Host"))
            try:
                plain = http_ece.decrypt(body, private_key=ua_key, auth_secret=auth_secret, version="aes128gcm")
                record["payload"] = json.loads(plain)
            except Exception as e:  # a failure is what the test reports
                record["error"] = repr(e)
                status = 400
        elif self.path.startswith("/gone/"):
            status = 410
        elif self.path == "/hook":
            ts = self.headers.get("X-Natrix-Timestamp", "")
            want = "sha256=" + hmac.new(HOOK_SECRET, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            record["signature_ok"] = hmac.compare_digest(want, self.headers.get("X-Natrix-Signature", ""))
            record["payload"] = json.loads(body)
        else:
            status = 404
        with LOCK, open(OUT, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"port": server.server_address[1], "p256dh": b64e(ua_public), "auth": b64e(auth_secret)}), flush=True)
server.serve_forever()
