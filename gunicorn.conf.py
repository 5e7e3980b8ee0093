"""gunicorn's settings file, read from the working directory (the repository root, /app in the image)."""


def pre_request(worker, req):
    """Close the connection after answering a request whose body is over the upload limit.

    The application answers it 413 without reading the body (config.request_limits); the unread bytes would
    otherwise be taken for the next request of a keep-alive connection. gunicorn ignores a `Connection`
    header set by the application, so the request is marked here, and gunicorn says `Connection: close`.
    """
    from config.request_limits import body_over_limit

    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), None)
    if body_over_limit(length):
        req.must_close = True
