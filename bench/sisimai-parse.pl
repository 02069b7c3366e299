#!/usr/bin/perl
# bench/sisimai-parse.pl ROUNDS FILE...: parses every file ROUNDS times with Sisimai in this
# one process and prints to stderr "SISIMAI files records best_secs first_secs". Used by
# bench/bounce-eval (rate) and bench/bounce-instructions (instructions, under callgrind).
# The first round also loads Sisimai's modules lazily: callers take the best round (or,
# under callgrind, the difference between runs of different ROUNDS). Every file is read
# before the first round and parsed from memory (`Sisimai->make(\$data)`, its
# Sisimai::Mail::Memory input: the same records as from the path, 431 on the corpus).
use strict; use warnings; use Sisimai; use Time::HiRes qw(time);
my $rounds = shift @ARGV;
my @data = map { local $/; open my $fh, '<:raw', $_ or die "$_: $!"; my $d = <$fh>; close $fh; $d } @ARGV;
my ($best, $first, $n, $records) = (1e9, 0, 0, 0);
for my $round (1 .. $rounds) {
    ($n, $records) = (0, 0);
    my $t0 = time;
    for my $d (@data) {
        my $v = eval { Sisimai->make(\$d) } // [];
        $records += scalar @$v; $n++;
    }
    my $secs = time - $t0;
    $first = $secs if $round == 1;
    $best = $secs if $secs < $best;
}
printf STDERR "SISIMAI %d %d %.6f %.6f\n", $n, $records, $best, $first;
