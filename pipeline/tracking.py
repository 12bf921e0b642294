"""Following people through a clip: the persons found in each analysed frame are linked to the tracks
of the frames before by an assignment over appearance and motion (scipy's linear_sum_assignment).

At the default stride (one analysed frame a second) people move far between two analysed frames, so
box overlap alone cannot tell two people apart, and a constant-velocity guess is wrong as soon as
someone turns; the FashionCLIP vector of each crop, computed anyway to match the catalogue, can. The
cost of giving detection d to track t is

    (1 - c_d) * (1 - cos(track's look, d's vector)) + (MOTION_WEIGHT + c_d) * motion(predicted box, d's box)

where the predicted box moves the track's last box by its last velocity; motion is the mean of
1 - IoU (telling near boxes apart) and the distance of the centres over twice the box height, capped
at 1 (still telling near from far once boxes no longer overlap, as at one analysed frame a second
they mostly do not); and c_d is the share of d's
box covered by another detection's box: where two people overlap, each crop shows some of the other,
so its vector is trusted less and the motion more. For people apart (c_d = 0) appearance decides and
motion breaks ties between people dressed alike. A pair whose appearance distance is over
MAX_APPEARANCE_DISTANCE is never joined, unless d is covered (its vector may show the other person)
and near the track's predicted box (motion under 1: overlapping it, or its centre within two box
heights).

A track's look is the mean of its uncovered crops' unit vectors, normalized: averaging over the
frames cancels the pose of single frames and keeps the distances a vote would throw away. A track not
seen for more than `max_gap` analysed frames ends: a person who leaves and comes back later gets a new
id (after a short absence within `max_gap`, the same one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .persons import Person, box_iou

MOTION_WEIGHT = 0.1
MAX_APPEARANCE_DISTANCE = 0.5
COVERED = 0.3  # a detection whose box is covered more than this by another's: its crop is not clean


@dataclass
class Sighting:
    """A track seen in one analysed frame."""

    frame: int
    time_s: float
    box_xyxy: np.ndarray  # float32 (4,)
    confidence: float
    vector: np.ndarray  # float32 (D,), unit norm
    covered: float = 0.0  # share of the box covered by another detection's box


@dataclass
class Track:
    id: int
    sightings: list[Sighting] = field(default_factory=list)
    _clean: np.ndarray | None = None  # float64 sum of the uncovered crops' vectors
    _all: np.ndarray | None = None  # float64 sum of all crops' vectors

    @property
    def last(self) -> Sighting:
        return self.sightings[-1]

    @property
    def look(self) -> np.ndarray:
        """The normalized mean of the unit vectors of its uncovered crops (of all its crops while it
        has no uncovered one): float32 (D,)."""
        v = self._clean if self._clean is not None else self._all
        if v is None:
            raise ValueError(f"track {self.id} has no sighting yet, so no look")
        n = float(np.linalg.norm(v))
        return (v / n if n > 0 else v).astype(np.float32)

    def add(self, s: Sighting) -> None:
        self.sightings.append(s)
        v = s.vector.astype(np.float64)
        self._all = v if self._all is None else self._all + v
        if s.covered <= COVERED:
            self._clean = v if self._clean is None else self._clean + v

    def predicted_box(self, frame: int) -> np.ndarray:
        """The last box moved by the last velocity (per frame) to `frame`."""
        if len(self.sightings) < 2:
            return self.last.box_xyxy
        a, b = self.sightings[-2], self.sightings[-1]
        velocity = (b.box_xyxy - a.box_xyxy) / max(1, b.frame - a.frame)
        return b.box_xyxy + velocity * (frame - b.frame)

    def box_at(self, frame: int, max_span: int | None = None) -> np.ndarray | None:
        """The box at any frame between its first and last sighting, interpolated linearly between
        the sightings around it; None outside, and between two sightings more than `max_span`
        frames apart (the person was not seen in the analysed frames between: a box drawn there
        would stand where nobody is)."""
        frames = [s.frame for s in self.sightings]
        if frame < frames[0] or frame > frames[-1]:
            return None
        k = int(np.searchsorted(frames, frame))
        if frames[k] == frame:
            return self.sightings[k].box_xyxy
        a, b = self.sightings[k - 1], self.sightings[k]
        if max_span is not None and b.frame - a.frame > max_span:
            return None
        w = (frame - a.frame) / (b.frame - a.frame)
        return (1 - w) * a.box_xyxy + w * b.box_xyxy


class Tracker:
    """Links persons frame to frame.

    Args:
        max_gap: analysed frames a track may go unseen before it ends.
    """

    def __init__(self, max_gap: int = 2) -> None:
        self.max_gap = max_gap
        self.tracks: list[Track] = []
        self.frames_seen: list[int] = []

    def _active(self) -> list[Track]:
        if not self.frames_seen:
            return []
        recent = set(self.frames_seen[-(self.max_gap + 1) :])
        return [t for t in self.tracks if t.last.frame in recent]

    def update(
        self, frame: int, time_s: float, persons: list[Person], vectors: dict[int, np.ndarray]
    ) -> dict[int, int]:
        """Link one analysed frame's persons to tracks.

        Args:
            persons: the frame's persons.
            vectors: person number -> its crop's unit vector; persons without one are not tracked.
        Returns:
            person number -> track id.
        """
        active = self._active()
        self.frames_seen.append(frame)
        people = sorted(vectors)
        covered = covered_shares([p.box_xyxy for p in persons])
        assigned: dict[int, int] = {}
        if active and people:
            looks = np.stack([t.look for t in active])
            vecs = np.stack([vectors[p] for p in people])
            appearance = 1.0 - looks @ vecs.T
            motion = motion_cost(
                np.stack([t.predicted_box(frame) for t in active]), np.stack([persons[p].box_xyxy for p in people])
            )
            c = covered[people][None, :]
            cost = (1.0 - c) * appearance + (MOTION_WEIGHT + c) * motion
            # A covered crop unlike the track may still be its person (it shows some of the other),
            # but only near where the track was going: far off (motion 1) it is someone else.
            unlike = appearance > MAX_APPEARANCE_DISTANCE
            cost = np.where(unlike & ((c <= COVERED) | (motion >= 1.0)), np.inf, cost)
            cost = np.where(np.isfinite(cost), cost, 1e6)  # linear_sum_assignment needs a feasible matrix
            from scipy.optimize import linear_sum_assignment

            for ti, pi in zip(*linear_sum_assignment(cost)):
                if cost[ti, pi] < 1e6:
                    assigned[people[pi]] = active[ti].id
        by_id = {t.id: t for t in self.tracks}
        for p in people:
            if p not in assigned:
                track = Track(id=len(self.tracks) + 1)
                self.tracks.append(track)
                by_id[track.id] = track
                assigned[p] = track.id
            person = persons[p]
            box = np.asarray(person.box_xyxy, np.float32)
            by_id[assigned[p]].add(Sighting(frame, time_s, box, person.confidence, vectors[p], float(covered[p])))
        return assigned


def motion_cost(predicted: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(T, D) in [0, 1]: the mean of 1 - IoU and the centres' distance over twice the taller box's
    height (capped at 1)."""
    p, b = np.asarray(predicted, np.float64), np.asarray(boxes, np.float64)
    centre_p, centre_b = (p[:, :2] + p[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    dist = np.linalg.norm(centre_p[:, None] - centre_b[None], axis=2)
    height = np.maximum((p[:, 3] - p[:, 1])[:, None], (b[:, 3] - b[:, 1])[None])
    far = np.minimum(1.0, np.divide(dist, 2 * height, out=np.ones_like(dist), where=height > 0))
    return 0.5 * (1.0 - box_iou(p, b)) + 0.5 * far


def covered_shares(boxes: list[np.ndarray]) -> np.ndarray:
    """For each box, the largest share of its area that one other box covers: float64 (N,)."""
    if len(boxes) < 2:
        return np.zeros(len(boxes))
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    share = np.divide(w * h, area[:, None], out=np.zeros((len(b), len(b))), where=area[:, None] > 0)
    np.fill_diagonal(share, 0.0)
    return share.max(axis=1)
