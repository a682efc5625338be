//! Procedural clips and their captions: the demo model's training data, and what its semantic
//! test checks generated videos against.
//!
//! A clip is `FRAMES` frames of `SIZE`x`SIZE` RGB: one or two shapes of a named colour, each
//! moving in a direction or growing or shrinking, on a plain or gradient background. Everything is
//! drawn from a seed, so a seed gives the same clip and caption on every machine.

/// Width and height of a clip, in pixels.
pub const SIZE: usize = 32;
/// Frames per clip (4k + 1, as the Wan VAE encodes them).
pub const FRAMES: usize = 9;
/// Pixels an object travels per frame when it moves.
const SPEED: f32 = 1.4;
/// Radius (disc), half side (square) or circumradius-like size (triangle) of a still object.
const RADIUS: f32 = 5.0;

/// An object's colour, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
}

impl Colour {
    /// Every colour, in caption order.
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    /// The colour drawn, RGB in [0, 1].
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Colour::Red => [0.86, 0.14, 0.14],
            Colour::Green => [0.14, 0.75, 0.22],
            Colour::Blue => [0.16, 0.33, 0.92],
            Colour::Yellow => [0.93, 0.84, 0.14],
        }
    }

    /// The colour of this palette nearest to `rgb` (squared distance).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        let d = |c: Colour| c.rgb().iter().zip(rgb).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        Colour::ALL
            .into_iter()
            .min_by(|a, b| d(*a).total_cmp(&d(*b)))
            .expect("the palette is not empty")
    }
}

/// An object's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A filled circle.
    Disc,
    /// An axis-aligned filled square.
    Square,
    /// A filled triangle, apex up.
    Triangle,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Disc, Shape::Square, Shape::Triangle];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Disc => "disc",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Whether the point `(x, y)` lies inside this shape of size `r` centred at `(cx, cy)`.
    fn covers(self, x: f32, y: f32, cx: f32, cy: f32, r: f32) -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match self {
            Shape::Disc => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r * 0.9 && dy.abs() <= r * 0.9,
            // Apex at (0, -r), base at y = +r * 0.8, half width r at the base.
            Shape::Triangle => {
                let (top, base) = (-r, 0.8 * r);
                dy >= top && dy <= base && dx.abs() <= r * (dy - top) / (base - top)
            }
        }
    }
}

/// What an object does over the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Motion {
    /// Moves towards smaller x.
    Left,
    /// Moves towards larger x.
    Right,
    /// Moves towards smaller y (up the picture).
    Up,
    /// Moves towards larger y.
    Down,
    /// Grows from small to large.
    Grow,
    /// Shrinks from large to small.
    Shrink,
}

impl Motion {
    /// Every motion.
    pub const ALL: [Motion; 6] = [
        Motion::Left,
        Motion::Right,
        Motion::Up,
        Motion::Down,
        Motion::Grow,
        Motion::Shrink,
    ];
    /// The four directions the semantic test checks.
    pub const DIRECTIONS: [Motion; 4] = [Motion::Left, Motion::Right, Motion::Up, Motion::Down];

    /// The caption phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Motion::Left => "moves to the left",
            Motion::Right => "moves to the right",
            Motion::Up => "moves up",
            Motion::Down => "moves down",
            Motion::Grow => "grows",
            Motion::Shrink => "shrinks",
        }
    }

    /// Unit displacement per frame, `(dx, dy)`, of a moving object; zero for growing and shrinking.
    pub fn step(self) -> (f32, f32) {
        match self {
            Motion::Left => (-1.0, 0.0),
            Motion::Right => (1.0, 0.0),
            Motion::Up => (0.0, -1.0),
            Motion::Down => (0.0, 1.0),
            Motion::Grow | Motion::Shrink => (0.0, 0.0),
        }
    }
}

/// A clip's background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Background {
    /// Near black.
    Black,
    /// Mid gray.
    Gray,
    /// Near white.
    White,
    /// A vertical gradient from dark navy to slate.
    Gradient,
}

impl Background {
    /// Every background.
    pub const ALL: [Background; 4] = [
        Background::Black,
        Background::Gray,
        Background::White,
        Background::Gradient,
    ];

    /// The caption word.
    pub fn word(self) -> &'static str {
        match self {
            Background::Black => "black",
            Background::Gray => "gray",
            Background::White => "white",
            Background::Gradient => "gradient",
        }
    }

    /// The colour at row `y`.
    fn rgb(self, y: usize) -> [f32; 3] {
        match self {
            Background::Black => [0.04, 0.04, 0.04],
            Background::Gray => [0.45, 0.45, 0.45],
            Background::White => [0.93, 0.93, 0.93],
            Background::Gradient => {
                let t = y as f32 / (SIZE - 1) as f32;
                [0.08 + 0.3 * t, 0.08 + 0.3 * t, 0.25 + 0.3 * t]
            }
        }
    }
}

/// One object of a clip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Its colour.
    pub colour: Colour,
    /// Its shape.
    pub shape: Shape,
    /// What it does.
    pub motion: Motion,
    /// Centre at frame 0, in pixels.
    pub start: (f32, f32),
}

impl Object {
    /// Centre and size at frame `f`.
    fn at(&self, f: usize) -> (f32, f32, f32) {
        let (dx, dy) = self.motion.step();
        let t = f as f32;
        let last = (FRAMES - 1) as f32;
        let r = match self.motion {
            Motion::Grow => 2.5 + 5.5 * t / last,
            Motion::Shrink => 8.0 - 5.5 * t / last,
            _ => RADIUS,
        };
        (self.start.0 + dx * SPEED * t, self.start.1 + dy * SPEED * t, r)
    }

    /// The caption clause, such as "a red disc moves to the left".
    pub fn clause(&self) -> String {
        format!(
            "a {} {} {}",
            self.colour.word(),
            self.shape.word(),
            self.motion.phrase()
        )
    }
}

/// A clip's content: what the generator draws and the caption says.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// One or two objects, drawn in order.
    pub objects: Vec<Object>,
    /// The background.
    pub background: Background,
    /// Whether the caption names the background.
    pub says_background: bool,
}

impl Scene {
    /// The caption: "a red disc moves to the left[ and a ...][ on a gray background]".
    pub fn caption(&self) -> String {
        let mut text = self
            .objects
            .iter()
            .map(Object::clause)
            .collect::<Vec<_>>()
            .join(" and ");
        if self.says_background {
            text.push_str(&format!(" on a {} background", self.background.word()));
        }
        text
    }

    /// Which pixels show an object, 1 or 0, `[FRAMES, SIZE, SIZE]`: those an object changes from
    /// the bare background (anti-aliased edges included).
    pub fn object_pixels(&self) -> Vec<f32> {
        let n = FRAMES * SIZE * SIZE;
        let clip = self.render();
        let bare = Scene {
            objects: Vec::new(),
            ..self.clone()
        }
        .render();
        (0..n)
            .map(|i| {
                let differs = (0..3).any(|c| (clip[c * n + i] - bare[c * n + i]).abs() > 0.05);
                if differs {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Which cells of a latent grid show an object in any frame they cover, 1 or 0,
    /// `[latent frames, SIZE / cell, SIZE / cell]`: the causal Wan VAE layout, where latent frame
    /// 0 is frame 0 and each later one covers the next `temporal` frames.
    pub fn object_cells(&self, cell: usize, temporal: usize) -> Vec<f32> {
        let pixels = self.object_pixels();
        let (side, frames) = (SIZE / cell, (FRAMES - 1) / temporal + 1);
        let mut out = vec![0.0f32; frames * side * side];
        for f in 0..FRAMES {
            let t = f.div_ceil(temporal);
            for y in 0..SIZE {
                for x in 0..SIZE {
                    if pixels[(f * SIZE + y) * SIZE + x] > 0.0 {
                        out[(t * side + y / cell) * side + x / cell] = 1.0;
                    }
                }
            }
        }
        out
    }

    /// The clip, `[3, FRAMES, SIZE, SIZE]` (channel, frame, row, column) in [-1, 1], anti-aliased
    /// by 4x4 supersampling.
    pub fn render(&self) -> Vec<f32> {
        const SS: usize = 4;
        let plane = SIZE * SIZE;
        let mut out = vec![0.0f32; 3 * FRAMES * plane];
        for f in 0..FRAMES {
            let placed: Vec<(Object, (f32, f32, f32))> = self.objects.iter().map(|o| (*o, o.at(f))).collect();
            for y in 0..SIZE {
                let bg = self.background.rgb(y);
                for x in 0..SIZE {
                    let mut acc = [0.0f32; 3];
                    for sy in 0..SS {
                        for sx in 0..SS {
                            let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                            let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                            // The last object drawn is on top.
                            let rgb = placed
                                .iter()
                                .rev()
                                .find(|(o, (cx, cy, r))| o.shape.covers(px, py, *cx, *cy, *r))
                                .map_or(bg, |(o, _)| o.colour.rgb());
                            acc.iter_mut().zip(rgb).for_each(|(a, v)| *a += v);
                        }
                    }
                    for (c, a) in acc.iter().enumerate() {
                        out[(c * FRAMES + f) * plane + y * SIZE + x] = 2.0 * a / (SS * SS) as f32 - 1.0;
                    }
                }
            }
        }
        out
    }
}

/// SplitMix64: a tiny, well-mixed generator, so that clips do not depend on any crate's RNG.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-7);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// The shape whose (colour, shape, direction) captions are held back from training for this colour
/// and direction: the semantic test asks for combinations the model never saw as such.
pub fn held_back_shape(colour: Colour, motion: Motion) -> Shape {
    let c = Colour::ALL.iter().position(|&x| x == colour).unwrap_or(0);
    let m = Motion::ALL.iter().position(|&x| x == motion).unwrap_or(0);
    Shape::ALL[(c + m) % Shape::ALL.len()]
}

/// Whether a training scene may hold this object: not a held-back combination.
fn trainable(o: &Object) -> bool {
    !Motion::DIRECTIONS.contains(&o.motion) || held_back_shape(o.colour, o.motion) != o.shape
}

/// A start position that keeps an object of this motion inside the frame for the whole clip.
fn start_for(motion: Motion, rng: &mut Rng) -> (f32, f32) {
    let travel = SPEED * (FRAMES - 1) as f32;
    let margin = RADIUS + 1.0;
    let span = SIZE as f32 - 2.0 * margin;
    let mut pick = |moving: f32| -> f32 {
        match moving {
            // Starts where the whole travel fits ahead of it.
            d if d > 0.0 => margin + rng.unit() * (span - travel),
            d if d < 0.0 => margin + travel + rng.unit() * (span - travel),
            _ => margin + 2.0 + rng.unit() * (span - 4.0),
        }
    };
    let (dx, dy) = motion.step();
    let x = pick(dx);
    let y = pick(dy);
    (x, y)
}

fn random_object(rng: &mut Rng, avoid: Option<Colour>) -> Object {
    loop {
        let colour = Colour::ALL[rng.below(Colour::ALL.len())];
        if Some(colour) == avoid {
            continue;
        }
        let motion = Motion::ALL[rng.below(Motion::ALL.len())];
        let o = Object {
            colour,
            shape: Shape::ALL[rng.below(Shape::ALL.len())],
            motion,
            start: start_for(motion, rng),
        };
        if trainable(&o) {
            return o;
        }
    }
}

/// Training scene number `index` of the stream seeded by `seed`: one object in four of five
/// scenes, two (of different colours) in the rest; the background named in half the captions.
pub fn training_scene(seed: u64, index: u64) -> Scene {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xD134_2543_DE82_EF95));
    let first = random_object(&mut rng, None);
    let mut objects = vec![first];
    if rng.below(5) == 0 {
        objects.push(random_object(&mut rng, Some(first.colour)));
    }
    Scene {
        objects,
        background: Background::ALL[rng.below(Background::ALL.len())],
        says_background: rng.below(2) == 0,
    }
}

/// The semantic test's prompts: for every colour and direction, the held-back shape doing it,
/// without a background (as a user would write it).
pub fn held_back_prompts() -> Vec<(Colour, Motion, String)> {
    let mut out = Vec::new();
    for colour in Colour::ALL {
        for motion in Motion::DIRECTIONS {
            let shape = held_back_shape(colour, motion);
            let prompt = format!("a {} {} {}", colour.word(), shape.word(), motion.phrase());
            out.push((colour, motion, prompt));
        }
    }
    out
}

/// Every word a caption can hold, for the demo tokenizer.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words = vec![
        "a",
        "on",
        "and",
        "background",
        "moves",
        "to",
        "the",
        "left",
        "right",
        "up",
        "down",
    ];
    words.extend(["grows", "shrinks"]);
    words.extend(Colour::ALL.map(Colour::word));
    words.extend(Shape::ALL.map(Shape::word));
    words.extend(Background::ALL.map(Background::word));
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_stay_in_frame() {
        for i in 0..200 {
            let a = training_scene(7, i);
            assert_eq!(a, training_scene(7, i));
            for o in &a.objects {
                for f in 0..FRAMES {
                    let (x, y, r) = o.at(f);
                    assert!(x - r >= 0.0 && x + r <= SIZE as f32, "{a:?} x at frame {f}");
                    assert!(y - r >= 0.0 && y + r <= SIZE as f32, "{a:?} y at frame {f}");
                }
                assert!(trainable(o));
            }
            let words = vocabulary();
            assert!(a.caption().split(' ').all(|w| words.contains(&w)), "{}", a.caption());
            // One token a word, and `</s>`: nothing is cut at the demo model's text length.
            let tokens = a.caption().split(' ').count() + 1;
            assert!(tokens <= crate::pipeline::demo::DEMO_TEXT_LEN, "{}", a.caption());
        }
    }

    #[test]
    fn a_rendered_object_has_its_colour_and_moves_its_way() {
        let scene = Scene {
            objects: vec![Object {
                colour: Colour::Red,
                shape: Shape::Disc,
                motion: Motion::Right,
                start: (10.0, 16.0),
            }],
            background: Background::Black,
            says_background: true,
        };
        assert_eq!(scene.caption(), "a red disc moves to the right on a black background");
        let clip = scene.render();
        let plane = SIZE * SIZE;
        let pixel =
            |c: usize, f: usize, y: usize, x: usize| (clip[(c * FRAMES + f) * plane + y * SIZE + x] + 1.0) / 2.0;
        let red = Colour::Red.rgb();
        assert!((0..3).all(|c| (pixel(c, 0, 16, 10) - red[c]).abs() < 1e-5));
        let last = FRAMES - 1;
        let x_end = (10.0 + SPEED * last as f32) as usize;
        assert!((0..3).all(|c| (pixel(c, last, 16, x_end) - red[c]).abs() < 1e-5));
        assert!(pixel(0, last, 16, 4) < 0.1, "the start is background by the end");
    }

    #[test]
    fn the_object_masks_cover_the_object_and_nothing_else() {
        let scene = Scene {
            objects: vec![Object {
                colour: Colour::Blue,
                shape: Shape::Square,
                motion: Motion::Right,
                start: (8.0, 8.0),
            }],
            background: Background::Gradient,
            says_background: false,
        };
        let pixels = scene.object_pixels();
        let at = |f: usize, y: usize, x: usize| pixels[(f * SIZE + y) * SIZE + x];
        assert_eq!((at(0, 8, 8), at(0, 8, 20), at(0, 24, 8)), (1.0, 0.0, 0.0));
        // A 9x9-pixel square (half side 4.5), give or take its anti-aliased edge.
        let first: f32 = pixels[..SIZE * SIZE].iter().sum();
        assert!((81.0..=121.0).contains(&first), "{first}");
        let last = FRAMES - 1;
        let x_end = (8.0 + SPEED * last as f32) as usize;
        assert_eq!((at(last, 8, x_end), at(last, 8, 4)), (1.0, 0.0));

        // 4x4-pixel cells, 4 frames a latent frame after the first: the square starts on pixels
        // 3 to 12 (cells 0 to 3), and the last latent frame (frames 5 to 8) reaches cell 5.
        let cells = scene.object_cells(4, 4);
        assert_eq!(cells.len(), 3 * 8 * 8);
        let cell = |t: usize, y: usize, x: usize| cells[(t * 8 + y) * 8 + x];
        assert_eq!((cell(0, 2, 2), cell(0, 2, 5), cell(0, 6, 2)), (1.0, 0.0, 0.0));
        assert_eq!((cell(2, 2, 5), cell(2, 2, 0)), (1.0, 0.0));
    }

    #[test]
    fn held_back_combinations_never_appear_in_training() {
        let held: Vec<_> = held_back_prompts();
        assert_eq!(held.len(), 16);
        for i in 0..2000 {
            let caption = training_scene(1, i).caption();
            assert!(held.iter().all(|(_, _, p)| !caption.contains(p.as_str())), "{caption}");
        }
    }
}
