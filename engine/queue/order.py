"""The fair order of the job queue as SQL: which jobs are next, and where a job stands.

Written once for SQLite and PostgreSQL (engine/queue/backend.py says how it is adapted). Needs the partial indexes
`jobs_queued_per_user` and `jobs_queued_per_user_model`.
"""

# Fair order of queued jobs: every user's first waiting job before anyone's second (round-robin), users served
# least recently first within a round, then priority, then age. A job's turn is 1 + the jobs of its user ahead of
# it (higher priority, or the same and older). Only what a question needs is computed, through index seeks, so the
# SQL of a claim or a position lookup takes about a millisecond with 10,000 jobs from 100 users waiting
# (bench/queue_load.py): the users with queued jobs are found by a skip scan of the partial index, one seek each.
# INDEXED BY pins the plans: without statistics SQLite may pick the status index and scan every queued job.
# A CTE marked MATERIALIZED is computed once: inlined, both databases would run its per-user subqueries again at
# every place its columns are used. Jobs are looked up by id in subqueries rather than joined, which PostgreSQL would
# do by hashing the whole table (bench/scale.py).
USERS_CTE = """
WITH RECURSIVE queued_users(user_key) AS (
    SELECT MIN(user_key) FROM jobs INDEXED BY jobs_queued_per_user WHERE status = 'queued'
    UNION ALL
    SELECT (SELECT MIN(j.user_key) FROM jobs j INDEXED BY jobs_queued_per_user
            WHERE j.status = 'queued' AND j.user_key > q.user_key)
    FROM queued_users q WHERE q.user_key IS NOT NULL
), users AS (
    SELECT q.user_key,
           COALESCE((SELECT MAX(r.started_at) FROM jobs r WHERE r.user_key = q.user_key), 0) AS last_served
    FROM queued_users q WHERE q.user_key IS NOT NULL
)
"""

# Of user `{j}`'s queued jobs, how many come before `{j}` (its turn - 1).
AHEAD_IN_TURN = """(
    (SELECT COUNT(*) FROM jobs a INDEXED BY jobs_queued_per_user
     WHERE a.status = 'queued' AND a.user_key = {j}.user_key AND a.priority > {j}.priority)
    + (SELECT COUNT(*) FROM jobs a INDEXED BY jobs_queued_per_user
       WHERE a.status = 'queued' AND a.user_key = {j}.user_key AND a.priority = {j}.priority AND a.id < {j}.id))"""


def next_sql(depth: int, excluded_models: int) -> str:
    """The first jobs in the fair order, the next one first: each user's first `depth` eligible jobs (a worker that
    finds the next one being claimed by another takes the one after it). Binds, for each of the `depth` turns, the
    `excluded_models` models whose jobs wait where they are (holding nobody's other jobs back); then how many jobs
    to return. SQLite takes no column in OFFSET, hence one SELECT per turn."""
    excluded = f"AND c.model NOT IN ({', '.join('?' * excluded_models)})" if excluded_models else ""
    turns = "\n    UNION ALL\n    ".join(
        f"""SELECT {turn} AS turn, u.last_served, (
        SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user WHERE c.status = 'queued' AND c.user_key = u.user_key
            {excluded}
        ORDER BY c.priority DESC, c.id LIMIT 1 OFFSET {turn}) AS id
    FROM users u"""
        for turn in range(depth)
    )
    return (
        USERS_CTE
        + f"""
, candidates AS MATERIALIZED (
    {turns}
)
SELECT p.id, (SELECT j.model FROM jobs j WHERE j.id = p.id) AS model,
       (SELECT j.passed_over FROM jobs j WHERE j.id = p.id) AS passed_over
FROM candidates p WHERE p.id IS NOT NULL
ORDER BY p.turn, (SELECT j.priority FROM jobs j WHERE j.id = p.id) DESC, p.last_served, p.id LIMIT ?
"""
    )


# The first job for model `?` in the fair order: the one a worker with that model loaded may take out of turn.
WARM_SQL = (
    USERS_CTE
    + f"""
, firsts AS MATERIALIZED (
    SELECT u.user_key, u.last_served, (
        SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user_model
        WHERE c.status = 'queued' AND c.user_key = u.user_key AND c.model = ?
        ORDER BY c.priority DESC, c.id LIMIT 1) AS id
    FROM users u
), ranked AS (
    SELECT f.user_key, f.last_served, f.id, (SELECT j.priority FROM jobs j WHERE j.id = f.id) AS priority
    FROM firsts f WHERE f.id IS NOT NULL
)
SELECT r.id FROM ranked r ORDER BY {AHEAD_IN_TURN.format(j="r")}, r.priority DESC, r.last_served, r.id LIMIT 1
"""
)

# A job's position: its own turn, plus from every other user the jobs in earlier turns and their job in the same
# turn when that one sorts first.
POSITION_SQL = (
    USERS_CTE
    + f"""
, me AS (
    SELECT j.id, j.user_key, j.priority, j.model, {AHEAD_IN_TURN.format(j="j")} AS ahead,
           (SELECT last_served FROM users WHERE user_key = j.user_key) AS last_served
    FROM jobs j WHERE j.id = ? AND j.status = 'queued'
), others AS MATERIALIZED (
    SELECT u.last_served,
           (SELECT COUNT(*) FROM jobs c INDEXED BY jobs_queued_per_user
            WHERE c.status = 'queued' AND c.user_key = u.user_key) AS queued,
           (SELECT c.id FROM jobs c INDEXED BY jobs_queued_per_user
            WHERE c.status = 'queued' AND c.user_key = u.user_key
            ORDER BY c.priority DESC, c.id LIMIT 1 OFFSET (SELECT ahead FROM me)) AS same_turn
    FROM users u WHERE u.user_key != (SELECT user_key FROM me)
), rivals AS (
    SELECT o.last_served, o.queued, o.same_turn,
           (SELECT s.priority FROM jobs s WHERE s.id = o.same_turn) AS same_priority
    FROM others o
)
SELECT CAST(me.ahead + 1 + COALESCE((
    SELECT SUM(CASE WHEN r.queued < me.ahead THEN r.queued ELSE me.ahead END
        + CASE WHEN r.same_priority > me.priority OR (r.same_priority = me.priority AND (r.last_served < me.last_served
            OR (r.last_served = me.last_served AND r.same_turn < me.id))) THEN 1 ELSE 0 END)
    FROM rivals r), 0) AS INTEGER) AS position, me.model
FROM me
"""
)
