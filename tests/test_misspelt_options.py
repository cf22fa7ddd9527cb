"""A misspelt option gets its closest name ("did you mean 'password'?") and a pointer to the
full list, not the list itself; against a real MariaDB where a pool is made."""

from __future__ import annotations

from typing import Any, Callable

import pytest

import connguard
from connguard import arguments
from tests.mariadb import APP_PASSWORD, MariaDB
from tests.optional import optional


def test_one_misspelt_name_gets_its_closest_known_one() -> None:
    text = arguments.unknown_names(["pasword"], ["password", "port", "user"], "argument")
    assert text == "unknown argument 'pasword' (did you mean 'password'?)"
    text = arguments.unknown_names(["zzz", "max_sise"], arguments.POOL_OPTIONS, "option")
    assert text == "unknown options 'max_sise' (did you mean 'max_size'?), 'zzz'"


@pytest.mark.parametrize("make", [
    lambda kwargs, typo: connguard.Pool(**kwargs, **typo),
    lambda kwargs, typo: connguard.connect(**kwargs, **typo),
], ids=["Pool", "connect"])
@pytest.mark.parametrize("typo, meant", [
    ({"pasword": "x"}, "password"), ({"max_sise": 3}, "max_size"), ({"databse": "app"},
                                                                    "database"),
])
def test_pool_and_connect_say_did_you_mean(mariadb: MariaDB, make: Callable[..., Any],
                                           typo: Any, meant: str) -> None:
    kwargs = mariadb.connect_kwargs()
    with pytest.raises(TypeError) as info:
        make(kwargs, typo)
    text = str(info.value)
    name = next(iter(typo))
    assert f"unknown argument {name!r} (did you mean {meant!r}?)" in text
    assert "the full list: connguard.arguments.POOL_OPTIONS and pymysql.connect's" in text
    assert len(text) < 250 and APP_PASSWORD not in text
    connguard.close_all()


def test_configure_says_did_you_mean() -> None:
    with pytest.raises(TypeError, match=r"configure\(\) got unknown option 'max_sise' \(did you "
                                        r"mean 'max_size'\?\); the full list: "):
        connguard.configure(max_sise=3)


@pytest.mark.parametrize("name, theirs", [
    ("connguard_checkout_timeout", "pool_timeout"), ("connguard_max_lifetime", "pool_recycle"),
    ("connguard_max_size", "pool_size"),
])
def test_a_pool_option_given_to_the_plugin_names_sqlalchemys_own(name: str, theirs: str) -> None:
    """connguard.Pool's name for what create_engine already takes: the plugin says which
    argument it is, not the plugin option closest in spelling."""
    sa = optional("sqlalchemy")
    with pytest.raises(sa.exc.ArgumentError) as caught:
        sa.create_engine(f"mysql+pymysql://u@127.0.0.1:1/db?plugin=connguard&{name}=5")
    text = str(caught.value)
    assert f"{name!r} is SQLAlchemy's own {theirs}=" in text, text
    assert "did you mean" not in text, text
