"""Certificates made at test time (trustme): a CA and what it issued, as objects and PEM files."""

import ssl

import trustme


class Pki:
    """A fresh CA and one certificate it issued for ``identities``, as objects and as PEM files."""

    def __init__(self, directory, name, *identities):
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*(identities or ("127.0.0.1", "localhost")))
        self.ca_file = str(directory / f"{name}-ca.pem")
        self.certfile = str(directory / f"{name}-cert.pem")
        self.keyfile = str(directory / f"{name}-key.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        with open(self.certfile, "wb") as out:
            out.write(b"".join(blob.bytes() for blob in self.cert.cert_chain_pems))
        self.cert.private_key_pem.write_to_path(self.keyfile)

    def client_context(self, maximum_version=None, alpn=None, client_cert=None):
        """A client context trusting only this CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(context)
        if maximum_version is not None:
            context.maximum_version = maximum_version
        if alpn:
            context.set_alpn_protocols(alpn)
        if client_cert is not None:
            client_cert.configure_cert(context)
        return context

    def server_context(self, client_ca=None):
        """A server context with this certificate; ``client_ca`` set: client certificates required."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.cert.configure_cert(context)
        if client_ca is not None:
            client_ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        return context
