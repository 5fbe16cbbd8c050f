"""Where a study lives: an Optuna storage, shared by every worker that joins the study.

- default: a SQLite file in the study folder, ``sqlite:///<study-dir>/study.db`` (embedded,
  nothing to start; one machine, a few workers);
- ``--storage postgresql://user:pass@host/db`` (or ``mysql+pymysql://...``, ``sqlite:///...``):
  any SQLAlchemy URL that Optuna's :class:`~optuna.storages.RDBStorage` takes: workers on many
  machines;
- ``--storage journal:/shared/fs/study.log``: Optuna's journal file storage
  (:class:`~optuna.storages.JournalStorage`), for a shared filesystem without a database server.

Workers' liveness is tracked by the trials themselves (``cmrcnn_ext.tune.workers``), the same
way for every storage kind, so a study resumes the same way whatever it is stored in.
"""

import os

from cmrcnn_ext.errors import UserError

__all__ = ["StorageError", "default_storage_url", "open_storage"]

JOURNAL_PREFIX = "journal:"


class StorageError(UserError):
    """A storage that cannot be opened (the message names the URL and the fix)."""


def default_storage_url(study_dir: str) -> str:
    """The SQLite file of a study folder."""
    return "sqlite:///" + os.path.join(os.path.abspath(study_dir), "study.db")


def open_storage(url: str):
    """An Optuna storage for ``url`` (see the module docstring).

    Raises:
        StorageError: an unknown scheme, a missing database driver, or a storage that cannot
            be reached.
    """
    import optuna

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        path = url[len(JOURNAL_PREFIX) :]
        if not path:
            raise StorageError("--storage journal: needs a file path, e.g. journal:/shared/a.log")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise StorageError(
            f"--storage {url!r} is not a storage URL: use a SQLAlchemy URL "
            "(sqlite:///path/study.db, postgresql://user:pass@host/db) or journal:/path/file.log"
        )
    engine_kwargs = {}
    if url.startswith("sqlite:"):
        # several workers on one SQLite file: wait for the write lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 120}}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as e:
        raise StorageError(
            f"--storage {url!r} needs a database driver that is not installed ({e}); e.g. "
            "`pip install psycopg2-binary` for postgresql://, `pip install pymysql` for "
            "mysql+pymysql://"
        ) from None
    except Exception as e:  # sqlalchemy.exc.*: bad URL, server unreachable, no permission
        raise StorageError(f"cannot open the study storage {url!r}: {e}") from None
