//! Reads a generated demo video back: which colour its object is and which way it moves. The
//! semantic test compares this with what the prompt asked for.

use super::clips::{held_back_prompts, Colour, Motion};
use crate::pipeline::{DiffusionBackend, DiffusionUserParams, GenError, Generator};
use burn::tensor::backend::Backend;

/// What a video shows, as far as [`judge`] can tell.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The palette colour most foreground pixels are nearest to; `None` without foreground.
    pub colour: Option<Colour>,
    /// The foreground centroid's travel from the first frames to the last, in pixels `(dx, dy)`.
    pub travel: (f32, f32),
    /// Foreground pixels per frame, on average.
    pub area: f32,
}

/// Travel, in pixels, below which an object counts as not moving.
pub const MIN_TRAVEL: f32 = 2.0;

impl Verdict {
    /// The direction of travel along its larger axis, if the object moved at least
    /// [`MIN_TRAVEL`] pixels.
    pub fn direction(&self) -> Option<Motion> {
        let (dx, dy) = self.travel;
        if dx.abs().max(dy.abs()) < MIN_TRAVEL {
            return None;
        }
        Some(match (dx.abs() >= dy.abs(), dx > 0.0, dy > 0.0) {
            (true, true, _) => Motion::Right,
            (true, false, _) => Motion::Left,
            (false, _, true) => Motion::Down,
            (false, _, false) => Motion::Up,
        })
    }
}

/// Reads `frames` (8-bit RGB, `[height, width, 3]` each).
///
/// The background of each row is taken from that row's two edge pixels (objects are drawn away
/// from the edges, and backgrounds are plain or vertical gradients); a pixel farther than 0.25
/// (RGB in [0, 1], Euclidean) from its row's background is foreground.
pub fn judge(width: usize, height: usize, frames: &[Vec<u8>]) -> Verdict {
    let mut votes = [0usize; Colour::ALL.len()];
    let centroids: Vec<Option<(f32, f32, f32)>> = frames
        .iter()
        .map(|frame| {
            let px = |x: usize, y: usize| -> [f32; 3] {
                let i = (y * width + x) * 3;
                [0, 1, 2].map(|c| frame[i + c] as f32 / 255.0)
            };
            let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
            for y in 0..height {
                let (l, r) = (px(0, y), px(width - 1, y));
                let bg = [0, 1, 2].map(|c| (l[c] + r[c]) / 2.0);
                for x in 0..width {
                    let p = px(x, y);
                    let d: f32 = p.iter().zip(bg).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
                    if d > 0.25 {
                        sx += x as f32;
                        sy += y as f32;
                        n += 1.0;
                        let c = Colour::nearest(p);
                        votes[Colour::ALL.iter().position(|&k| k == c).unwrap_or(0)] += 1;
                    }
                }
            }
            (n > 0.0).then(|| (sx / n, sy / n, n))
        })
        .collect();
    let colour = votes
        .iter()
        .enumerate()
        .max_by_key(|(_, &v)| v)
        .filter(|(_, &v)| v > 0)
        .map(|(i, _)| Colour::ALL[i]);
    // The mean centroid of the first and of the last third of the frames.
    let third = (frames.len() / 3).max(1);
    let mean = |part: &[Option<(f32, f32, f32)>]| {
        let seen: Vec<(f32, f32)> = part.iter().flatten().map(|&(x, y, _)| (x, y)).collect();
        (!seen.is_empty()).then(|| {
            let n = seen.len() as f32;
            (
                seen.iter().map(|p| p.0).sum::<f32>() / n,
                seen.iter().map(|p| p.1).sum::<f32>() / n,
            )
        })
    };
    let travel = match (mean(&centroids[..third]), mean(&centroids[centroids.len() - third..])) {
        (Some(a), Some(b)) => (b.0 - a.0, b.1 - a.1),
        _ => (0.0, 0.0),
    };
    let area = centroids.iter().flatten().map(|c| c.2).sum::<f32>() / frames.len().max(1) as f32;
    Verdict { colour, travel, area }
}

/// One held-back prompt's outcome: what it asked for and what the video shows.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The prompt.
    pub prompt: String,
    /// The colour it names.
    pub colour: Colour,
    /// The direction it names.
    pub motion: Motion,
    /// What the generated video shows.
    pub verdict: Verdict,
}

impl Outcome {
    /// Whether the video has the prompt's colour and moves in its direction.
    pub fn correct(&self) -> bool {
        self.verdict.colour == Some(self.colour) && self.verdict.direction() == Some(self.motion)
    }
}

/// Generates every held-back prompt ([`held_back_prompts`]: each colour and direction, with a
/// shape the model never saw doing it) with the demo sampler's defaults and `seed`, and reads
/// each video back; with `sheets`, writes each video's contact sheet there.
pub fn evaluate<B: Backend>(
    backend: DiffusionBackend<B>,
    seed: u64,
    sheets: Option<&std::path::Path>,
) -> Result<Vec<Outcome>, GenError> {
    let generator = Generator::new(backend);
    let mut out = Vec::new();
    for (colour, motion, prompt) in held_back_prompts() {
        let video = generator.generate(DiffusionUserParams {
            seed,
            ..DiffusionUserParams::demo(prompt.clone())
        })?;
        if let Some(dir) = sheets {
            video.save_png_sheet(dir.join(format!("{}.png", video.stem())))?;
        }
        let f = video.frames();
        out.push(Outcome {
            verdict: judge(f.width, f.height, &f.frames),
            prompt,
            colour,
            motion,
        });
    }
    Ok(out)
}

/// The outcomes as a Markdown table (one row per prompt) with the count correct.
pub fn confusion_table(outcomes: &[Outcome]) -> String {
    let mut s =
        String::from("| prompt | colour seen | travel (dx, dy) px | direction seen | ok |\n|---|---|---|---|---|\n");
    for o in outcomes {
        let v = &o.verdict;
        s.push_str(&format!(
            "| {} | {} | ({:+.1}, {:+.1}) | {} | {} |\n",
            o.prompt,
            v.colour.map_or("none", |c| c.word()),
            v.travel.0,
            v.travel.1,
            v.direction().map_or("none", |m| m.phrase()),
            if o.correct() { "yes" } else { "no" }
        ));
    }
    let right = outcomes.iter().filter(|o| o.correct()).count();
    s.push_str(&format!("\n{right} of {} correct\n", outcomes.len()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::clips::{Background, Object, Scene, Shape, FRAMES, SIZE};

    /// A rendered clip as 8-bit frames, as a decoded video gives them.
    fn frames(scene: &Scene) -> Vec<Vec<u8>> {
        let clip = scene.render();
        let plane = SIZE * SIZE;
        (0..FRAMES)
            .map(|f| {
                (0..plane)
                    .flat_map(|i| (0..3).map(move |c| (c, i)))
                    .map(|(c, i)| ((clip[(c * FRAMES + f) * plane + i] + 1.0) * 127.5).round() as u8)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_judge_reads_every_colour_and_direction_of_drawn_clips() {
        for colour in Colour::ALL {
            for motion in Motion::DIRECTIONS {
                for background in Background::ALL {
                    let start = match motion {
                        Motion::Left => (24.0, 16.0),
                        Motion::Right => (8.0, 16.0),
                        Motion::Up => (16.0, 24.0),
                        _ => (16.0, 8.0),
                    };
                    let scene = Scene {
                        objects: vec![Object {
                            colour,
                            shape: Shape::Triangle,
                            motion,
                            start,
                        }],
                        background,
                        says_background: false,
                    };
                    let v = judge(SIZE, SIZE, &frames(&scene));
                    assert_eq!(v.colour, Some(colour), "{scene:?}: {v:?}");
                    assert_eq!(v.direction(), Some(motion), "{scene:?}: {v:?}");
                }
            }
        }
    }

    #[test]
    fn a_still_or_empty_video_has_no_direction() {
        let scene = Scene {
            objects: vec![Object {
                colour: Colour::Red,
                shape: Shape::Disc,
                motion: Motion::Grow,
                start: (16.0, 16.0),
            }],
            background: Background::Gray,
            says_background: false,
        };
        assert_eq!(judge(SIZE, SIZE, &frames(&scene)).direction(), None);
        let empty = Scene {
            objects: vec![],
            ..scene
        };
        let v = judge(SIZE, SIZE, &frames(&empty));
        assert_eq!((v.colour, v.direction()), (None, None));
    }
}
