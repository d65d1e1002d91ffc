"""The chat core's flows, once for every platform, driven the way an adapter drives them: who may do what, requests
and their answers, cancel and reroll. Each platform's tests check the translation end to end."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bot.chat import texts
from bot.chat.core import NOT_ALLOWED, NOT_YOURS_TO_REROLL, AccessPolicy, Answer, Ask, ChatCore, Person, Place
from engine.jobs import JobStatus
from tests import imagefactory

ALICE, BOB, ADMIN = Person("1", "alice"), Person("2", "bob"), Person("9", "root")
HERE = Place("c1", guild_id="g1")


@dataclass
class FakePicture:
    """A picture as an adapter hands it over; `reads` counts the downloads."""

    data: bytes
    declared_size: int | None = None
    filename: str | None = "picture.png"
    reads: list[int] = field(default_factory=list)

    async def read(self, limit_bytes: int, label: str) -> bytes:
        self.reads.append(limit_bytes)
        return self.data


def core_for(engine: object, **access: frozenset[str]) -> ChatCore:
    policy = AccessPolicy("telegram", admins=frozenset({"telegram:9"}), **access)
    return ChatCore(engine, policy, 1_000_000, lambda error: False, "(how to ask here)")


def ask(person: Person, text: str, message_id: str = "m1", pictures: list[FakePicture] | None = None) -> Ask:
    return Ask(person, HERE, message_id, {}, lambda: texts.parse_message(text, None, bool(pictures)), pictures or [])


async def test_an_outsider_is_refused_every_flow_and_an_admin_passes_every_allowlist(engine):
    core = core_for(engine, users=frozenset({"1"}))
    await engine.set_paused(True)
    assert await core.request(ask(ALICE, "a fox")) is None
    job = (await engine.jobs(texts.ACTIVE))[0]
    refused = [
        (await core.request(ask(BOB, "let me in", "m2"))).text,
        await core.queue_text(BOB, HERE),
        await core.status_text(BOB, HERE),
        core.help_text(BOB, HERE),
        await core.cancel(BOB, HERE, str(job.id)),
        await core.cancel(BOB, HERE),
        await core.reroll_refusal(BOB, HERE, job.id),
        await core.pause(BOB, HERE, paused=False),
        await core.previews(BOB, HERE, "off"),
    ]
    assert refused == [NOT_ALLOWED] * len(refused)
    assert "Only admins" in await core.pause(ALICE, HERE, paused=False)  # allowed here, but no admin
    assert (await engine.job(job.id)).status is JobStatus.QUEUED and await engine.counts() == {"queued": 1}
    assert "(how to ask here)" in core.help_text(ADMIN, HERE)
    assert await core.cancel(ADMIN, HERE, f"#{job.id}") == f"Job #{job.id} is cancelled."


def test_the_access_policy_checks_users_chats_servers_and_roles_together():
    policy = AccessPolicy(
        "discord",
        admins=frozenset({"discord:9"}),
        chats=frozenset({"c1"}),
        guilds=frozenset({"g1"}),
        roles=frozenset({"r1"}),
    )
    member = Person("1", roles=frozenset({"r1", "r2"}))
    assert policy.allows(member, HERE)
    assert not policy.allows(Person("1", roles=frozenset({"r2"})), HERE)  # no allowed role
    assert not policy.allows(member, Place("c2", "g1"))  # another channel
    assert not policy.allows(member, Place("c1", None))  # a direct message: no server
    assert policy.allows(Person("9"), Place("anywhere"))
    assert AccessPolicy("telegram").allows(Person("1"), Place("c1"))  # no lists: everyone


async def test_a_request_is_queued_once_and_answered_again_with_its_place(engine):
    core = core_for(engine)
    await engine.set_paused(True)
    assert await core.request(ask(ALICE, "a fox seed=3")) is None  # the relay shows the new job's place
    again = await core.request(ask(ALICE, "a fox seed=3"))
    job = (await engine.jobs(texts.ACTIVE))[0]
    assert again == Answer(again.text, "cancel", job.id) and "already" in again.text
    assert await core.already_queued(ALICE, HERE, "m1") and not await core.already_queued(ALICE, HERE, "m2")
    assert job.source.user_name == "alice" and job.params.seed == 3


async def test_bad_requests_get_their_reason_and_nothing_is_downloaded_or_queued(engine):
    core = core_for(engine)
    big = FakePicture(imagefactory.png(), declared_size=5_000_000)
    answers = [
        await core.request(ask(ALICE, "a fox steps=many")),
        await core.request(ask(ALICE, "a fox", "m2", [big])),
    ]
    assert "steps must be a number, not 'many'" in answers[0].text
    assert "is 5.0 MB; the most I can fetch is 1.0 MB" in answers[1].text
    assert big.reads == [] and await engine.counts() == {}


async def test_a_picture_request_is_checked_against_the_limits_before_its_picture_is_fetched(engine):
    core = core_for(engine)
    await engine.set_paused(True)
    for number in range(engine.settings.queue.per_user_limit):
        assert await core.request(ask(ALICE, f"fox {number}", f"m{number}")) is None
    picture = FakePicture(imagefactory.png())
    answer = await core.request(ask(ALICE, "one more", "m-last", [picture]))
    assert "You already have 3 videos waiting" in answer.text and picture.reads == []


async def test_an_unexpected_fault_is_an_apology_not_a_crash(engine, caplog):
    def unreadable() -> texts.ParsedMessage:
        raise RuntimeError("a bug")

    answer = await core_for(engine).request(Ask(ALICE, HERE, "m1", {}, unreadable))
    assert answer == Answer(texts.apology()) and "request failed" in caplog.text


async def test_cancel_takes_a_number_or_the_latest_and_refuses_other_peoples_jobs(engine):
    core = core_for(engine)
    await engine.set_paused(True)
    for message in ("m1", "m2"):
        await core.request(ask(ALICE, f"fox {message}", message))
    first, second = sorted(job.id for job in await engine.jobs(texts.ACTIVE))
    assert "belongs to someone else" in await core.cancel(BOB, HERE, str(first))
    assert "'x1' is not a job number" in await core.cancel(ALICE, HERE, "x1")
    assert await core.cancel(ALICE, HERE) == f"Job #{second} is cancelled."
    assert await core.cancel(ALICE, HERE, str(first)) == f"Job #{first} is cancelled."
    assert await core.cancel(ALICE, HERE) == "You have no job to cancel.\nSee /queue for your jobs."


async def test_only_the_owner_or_an_admin_rerolls_and_the_new_job_is_the_owners(engine):
    core = core_for(engine)
    await core.request(ask(ALICE, "a fox seed=4"))
    job = (await engine.jobs(texts.ACTIVE))[0]
    await core.cancel(ALICE, HERE, str(job.id))  # finished, as a reroll needs
    assert await core.reroll_refusal(BOB, HERE, job.id) == NOT_YOURS_TO_REROLL
    assert await core.reroll_refusal(ALICE, HERE, job.id) is None
    assert "no job" in (await core.reroll_refusal(ALICE, HERE, 999)).lower()
    assert await core.reroll_refusal(ADMIN, HERE, job.id) is None
    assert await core.reroll(ADMIN, job.id, "reroll-1", {"where": "here"}) is None
    rerolled = (await engine.jobs(texts.ACTIVE))[0]
    assert rerolled.retry_of == job.id and rerolled.source.user_id == ALICE.user_id
    assert rerolled.source.reply == {"where": "here"} and rerolled.params.seed != 4


async def test_queue_lists_the_users_jobs_with_their_places(engine):
    core = core_for(engine)
    await engine.set_paused(True)
    await core.request(ask(BOB, "bob's cat", "b1"))
    await core.request(ask(ALICE, "alice's fox", "a1"))
    assert await core.queue_text(ALICE, HERE) == "#2 t2v · position 2 · alice's fox"
    assert await core.queue_text(ADMIN, HERE) == "You have no videos waiting or running."


@pytest.mark.parametrize("paused", [True, False])
async def test_pause_and_resume_are_for_admins(engine, paused):
    core = core_for(engine)
    assert "Only admins" in await core.pause(ALICE, HERE, paused)
    answer = await core.pause(ADMIN, HERE, paused)
    assert await engine.is_paused() is paused and answer.startswith("Paused" if paused else "Resumed")


async def test_a_reroll_the_owners_limits_would_refuse_is_refused_before_anything_is_posted(engine):
    core = core_for(engine)
    await core.request(ask(ALICE, "a fox", "m0"))
    first = (await engine.jobs(texts.ACTIVE))[0]
    await core.cancel(ALICE, HERE, str(first.id))
    await engine.set_paused(True)
    for number in range(engine.settings.queue.per_user_limit):
        await core.request(ask(ALICE, f"fox {number}", f"m{number + 1}"))
    refusal = await core.reroll_refusal(ALICE, HERE, first.id)
    assert refusal is not None and refusal.startswith("You already have 3 videos waiting")
