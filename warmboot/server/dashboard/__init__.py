"""The web dashboard, served by the HTTP gateway under ``/_dashboard/`` with a login token.

``auth`` (the token and its cookie), ``views`` (what each page shows, read from the server's state), ``pages``
(HTML, every value escaped), ``charts`` (SVG drawn on the server: no JavaScript library, nothing fetched from a
CDN), ``app`` (the ASGI app: routes, headers). The only script is ``static/tail.js``, the live log tail.
"""
