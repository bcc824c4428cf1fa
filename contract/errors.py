"""Errors caused by the user's input or settings. Their message names the culprit and says how to
fix it; the CLI prints it plainly instead of a traceback."""


class UserError(ValueError):
    pass
