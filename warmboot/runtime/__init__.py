"""Code that runs *inside* a container. Its import time is every user's cold start: keep it to the stdlib
(plus cloudpickle, imported only when a call arrives) and import nothing else of warmboot but :mod:`wire`."""
