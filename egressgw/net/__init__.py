"""Sockets on the gateway's own epoll set: the reactor, streams and the accepting listener."""
