#!/usr/bin/perl
# A fault-injecting stand-in for a token worker, for hsm/tests/pipe.rs only. A real worker never
# writes a corrupt frame, so this runs the real worker (which keeps our stdin) and corrupts its
# Nth reply frame on the way out. Frame 0 is the handshake's answer and always passes.
#
#   perl faulty-worker.pl MODE N WORKER [ARGS...]
#   MODE: trailing  one byte appended to the frame's body (its length grows by one)
#         wrong-id  the request id (first 8 body bytes, little-endian) plus one
#         garbage   everything after the id replaced by 0xff
#         duplicate the frame sent twice (the second copy answers an id already answered)
use strict;
use warnings;

my ($mode, $nth, @worker) = @ARGV;
open(my $from, '-|', @worker) or die "cannot start the worker: $!";
binmode $from;
binmode STDOUT;
$| = 1;

sub take {
    my ($n) = @_;
    my $buf = '';
    while (length($buf) < $n) {
        my $got = read($from, $buf, $n - length($buf), length($buf));
        return undef unless $got;
    }
    return $buf;
}

my $count = 0;
while (defined(my $len = take(4))) {
    my $body = take(unpack('V', $len));
    last unless defined $body;
    if ($count++ == $nth) {
        if ($mode eq 'trailing') {
            $body .= "\0";
        } elsif ($mode eq 'wrong-id') {
            substr($body, 0, 8) = pack('Q<', unpack('Q<', substr($body, 0, 8)) + 1);
        } elsif ($mode eq 'garbage') {
            substr($body, 8) = "\xff" x (length($body) - 8);
        } elsif ($mode eq 'duplicate') {
            print STDOUT pack('V', length $body), $body;
        }
    }
    print STDOUT pack('V', length $body), $body;
}
