"""Features as text: what the BERT towers read.

* Item text: ``"Toy Story (1995). Genres: Animation, Children's, Comedy"``.
* Profile text: ``"Age 25-34, male, engineer."``.
* Query text: the profile plus the titles of the user's most recent well-rated movies, rated
  strictly before the event: ``"Age 25-34, male, engineer. Liked: Fargo (1996); Heat (1995)."``.
"""

from __future__ import annotations

from trainer.data.movielens import Item, User

#: Age bands of MovieLens-1M, used for every data set so ages are comparable.
AGE_BANDS = (
    (18, "under 18"),
    (25, "18-24"),
    (35, "25-34"),
    (45, "35-44"),
    (50, "45-49"),
    (56, "50-55"),
)
GENDERS = {"M": "male", "F": "female"}


def age_band(age: int | None) -> str:
    if age is None:
        return "unknown"
    for upper, band in AGE_BANDS:
        if age < upper:
            return band
    return "56+"


def movie_name(item: Item) -> str:
    return f"{item.title} ({item.year})" if item.year else item.title


def item_text(item: Item) -> str:
    genres = ", ".join(item.genres) if item.genres else "unknown"
    return f"{movie_name(item)}. Genres: {genres}"


def profile_text(age: str, gender: str, occupation: str) -> str:
    """Profile sentence from the stored categorical fields (an age band, not an age)."""
    parts = [
        f"Age {age}" if age != "unknown" else "Age unknown",
        GENDERS.get(gender, gender or "unknown gender"),
        occupation or "unknown occupation",
    ]
    return ", ".join(parts) + "."


def user_fields(user: User) -> dict[str, str]:
    """The categorical profile fields stored beside the text."""
    return {
        "user_id": user.user_id,
        "user_age": age_band(user.age),
        "user_gender": user.gender or "unknown",
        "user_occupation": user.occupation or "unknown",
    }


def query_text(fields: dict[str, str], liked_titles: list[str]) -> str:
    """Profile plus liked titles (most recent first)."""
    profile = profile_text(fields["user_age"], fields["user_gender"], fields["user_occupation"])
    liked = "; ".join(liked_titles) if liked_titles else "nothing yet"
    return f"{profile} Liked: {liked}."
